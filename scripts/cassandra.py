#!/usr/bin/env python3
"""A real single-node Apache Cassandra on loopback: see clients/cassandra_node.py.

    python scripts/cassandra.py start|stop|status [--dir DIR] [--fresh]
    python scripts/cassandra.py run [--dir DIR] -- COMMAND...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.cassandra_node import main

if __name__ == "__main__":
    sys.exit(main())
