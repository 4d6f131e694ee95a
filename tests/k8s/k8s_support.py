"""Helpers shared by the tests under tests/k8s: free ports and a moto S3 server process."""

from __future__ import annotations

from tests.s3server import CREDS, moto_server
from tests.stack import free_port

__all__ = ["CREDS", "free_port", "moto_server"]
