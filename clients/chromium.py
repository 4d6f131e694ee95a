"""`make browser` (scripts/chromium.py): Debian's Chromium for the page tests (the rides live map).

Pages are tested in headless Chromium driven by Playwright (the `playwright`
wheel, dev dependency) with ``executable_path``: Playwright's own browser
download is never used. When /usr/bin/chromium is missing it is installed
with apt-get (as root). Without root or apt-get this prints one line saying
why and exits 0, except under CI=true, where that is a failure; the page
tests then skip (or, under CI=true, fail) with the same reason.

    python scripts/chromium.py ensure    # install when missing
    python scripts/chromium.py path      # print the browser's path, or why there is none
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# Flags for a closed network and a root user: no sandbox (root), no background
# connections (they are refused here and slow every start), a fresh profile.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage"]


def browser() -> str | None:
    for c in CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("chromium")


def unavailable() -> str:
    """Why there is no browser and none can be installed, or ""."""
    if browser():
        return ""
    if sys.platform != "linux" or shutil.which("apt-get") is None:
        return "Chromium is not installed and there is no apt-get to install it"
    if os.geteuid() != 0:
        return "Chromium is not installed (`apt-get install chromium` needs root)"
    return ""


def ensure() -> int:
    if browser():
        print(f"chromium: {browser()}")
        return 0
    why = unavailable()
    if why:
        print(f"chromium: skipped: {why}")
        return 1 if os.environ.get("CI") == "true" else 0
    print("chromium: apt-get install chromium (for the page tests)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print("\n".join((r.stdout + r.stderr).strip().splitlines()[-20:]))
            print(f"chromium: {' '.join(cmd)} exited {r.returncode}")
            return 1 if os.environ.get("CI") == "true" else 0
    print(f"chromium: {browser()}")
    return 0 if browser() else 1


def main() -> int:
    cmd = sys.argv[1] if len(sys.argv) > 1 else "ensure"
    if cmd == "ensure":
        return ensure()
    if cmd == "path":
        print(browser() or unavailable())
        return 0 if browser() else 1
    print(__doc__)
    return 2
