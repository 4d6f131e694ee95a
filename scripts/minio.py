#!/usr/bin/env python3
"""A real MinIO server on loopback, built from the Go module proxy: see clients/minio_server.py.

    python scripts/minio.py build
    python scripts/minio.py start|stop [--dir DIR]
    python scripts/minio.py run [--dir DIR] -- COMMAND...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.minio_server import main

if __name__ == "__main__":
    sys.exit(main())
