from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack import StackProcess


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    """One running `sysdesign up` for the integration tests that do not restart it."""
    s = StackProcess(tmp_path_factory.mktemp("stack") / "data").start()
    yield s
    code = s.stop()
    assert code == 0, f"stack exited with {code} on SIGTERM:\n{s.logs()}"


@pytest.fixture(scope="session")
def alice(stack: StackProcess) -> str:
    return stack.token("alice")


@pytest.fixture(scope="session")
def bob(stack: StackProcess) -> str:
    return stack.token("bob")
