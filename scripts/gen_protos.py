"""Regenerate the committed Python stubs under generated/ from protos/.

Usage: python scripts/gen_protos.py [OUT_DIR]

The stubs are generated with `-Iprotos`, so imports read
`from sysdesign.shortener.v1 import shortener_pb2`; `generated/` is a source
root. The drift test runs this into a temporary directory and compares.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# The top-level packages under protos/: sysdesign's own contracts, Envoy's
# rate limit service contract (same full names and field numbers as Envoy's),
# and protovalidate's rule annotations (buf/validate/validate.proto, as
# published in build.buf:protovalidate on Maven Central; protos/buf/README.md).
ROOTS = ("sysdesign", "envoy", "buf")


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    # protoc finds the mypy plugins on PATH: use the ones next to this interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    sources = sorted(PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Regular packages, so setuptools finds them and mypy resolves them.
    for d in [p for p in out.rglob("*") if p.is_dir()]:
        if "__pycache__" in d.parts:
            continue
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
    for top in ROOTS:
        (out / top / "py.typed").write_text("")
    return sources


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "generated"
    if out == ROOT / "generated":
        for top in ROOTS:
            if (out / top).exists():
                shutil.rmtree(out / top)
    sources = generate(out)
    print(f"generated stubs for {len(sources)} protos into {out}")


if __name__ == "__main__":
    main()
