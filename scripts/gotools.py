#!/usr/bin/env python3
"""The Go programs the project runs (MinIO, grpcurl, buf, kustomize, kubeconform, envoyproxy/ratelimit), built from the Go module proxy: see clients/gotools.py.

    python scripts/gotools.py build [NAME ...]
    python scripts/gotools.py path NAME
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.gotools import main

if __name__ == "__main__":
    sys.exit(main())
