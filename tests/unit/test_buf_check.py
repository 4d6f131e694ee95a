"""scripts/buf_check.py: buf lint passes on protos/, and a wire-breaking edit fails `buf breaking`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]


def _repo(tmp_path: Path) -> Path:
    """A git repo holding this checkout's protos/ and buf.yaml, committed once."""
    from clients import gotools

    why = gotools.missing_go(gotools.TOOLS["buf"])
    if why:
        skip_or_fail("buf checks", why)
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", repo / "protos")
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "buf_check.py", repo / "scripts" / "buf_check.py")
    shutil.copytree(ROOT / "clients", repo / "clients", ignore=shutil.ignore_patterns(
        "go", "java", "typescript", "rust", "python", "__pycache__"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    return repo


def check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "scripts/buf_check.py", "--against", "HEAD"], cwd=repo,
                          capture_output=True, text=True, timeout=300)


def test_protos_lint_clean_and_an_addition_is_not_breaking(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    proto = repo / "protos/sysdesign/shortener/v1/shortener.proto"
    proto.write_text(proto.read_text().replace("message GetShortUrlRequest {\n  string code = 1;\n",
                                               "message GetShortUrlRequest {\n  string code = 1;\n"
                                               "  // A new optional field.\n  string note = 9;\n"))
    r = check(repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lint clean, nothing breaks HEAD" in r.stderr


def test_a_renumbered_field_fails_breaking(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    proto = repo / "protos/sysdesign/chat/v1/chat.proto"
    proto.write_text(proto.read_text().replace("  string text = 6;", "  string text = 16;", 1))
    r = check(repo)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'field "6" with name "text"' in r.stdout + r.stderr


def test_a_lint_violation_fails(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    proto = repo / "protos/sysdesign/shortener/v1/shortener.proto"
    proto.write_text(proto.read_text() + "\nmessage bad_name {}\n")
    r = check(repo)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "bad_name" in r.stdout + r.stderr
