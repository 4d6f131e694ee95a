#!/usr/bin/env python3
"""`make browser`: Debian's Chromium for the page tests (clients/chromium.py says how)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.chromium import main

if __name__ == "__main__":
    sys.exit(main())
