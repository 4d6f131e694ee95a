#!/usr/bin/env python3
"""`make lint`'s contract checks: `buf lint` (STANDARD, buf.yaml) and `buf breaking` on protos/.

    python scripts/buf_check.py            # lint, then breaking against the previous commit
    python scripts/buf_check.py --against REF

`buf breaking` compares protos/ with the same directory at REF (default
HEAD~1, the previous commit of the branch, so a wire- or source-breaking
change fails the build where it is made). buf itself is built from the Go
module proxy (clients/gotools.py); without Go both checks are skipped with one
line saying why, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients import gotools  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="HEAD~1", help="git ref to compare protos/ with (default HEAD~1)")
    args = ap.parse_args()
    why = gotools.missing_go(gotools.TOOLS["buf"])
    if why:
        return gotools.unavailable("lint and breaking", why, prefix="buf: ")
    buf = str(gotools.build("buf"))
    if subprocess.run([buf, "lint"], cwd=ROOT).returncode != 0:
        return 1
    has_ref = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.against}^{{commit}}"],
                             cwd=ROOT, capture_output=True).returncode == 0
    if not has_ref:
        print(f"buf: breaking skipped: {args.against} is not in this clone (shallow or first commit)",
              file=sys.stderr)
        return 0
    r = subprocess.run([buf, "breaking", "protos", "--against", f".git#ref={args.against},subdir=protos"],
                       cwd=ROOT)
    if r.returncode != 0:
        print(f"buf: protos/ breaks compatibility with {args.against} (see above); a breaking change needs "
              "a new package version (v2), not an edit of v1", file=sys.stderr)
        return 1
    print(f"buf: lint clean, nothing breaks {args.against}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
