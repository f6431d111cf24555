"""Real `decodekit serve` processes on free loopback ports, always shut down (and checked to exit 0)."""
from __future__ import annotations

import pytest

from serve_helpers import TINY, ServerProcess


@pytest.fixture(scope="session")
def server():
    """The main test server: the tiny random model, greedy by default, defaults for everything else."""
    s = ServerProcess("--model", TINY)
    yield s
    rc = s.stop()
    assert rc == 0, f"the server exited with {rc}:\n{s.stderr()}"


@pytest.fixture(scope="session")
def strict_server():
    """A server with an API key, one running sequence, one queue place and a 3 s time limit per request."""
    s = ServerProcess("--model", TINY, "--api-key", "sesame", "--max-running", "1", "--max-queue", "1",
                      "--request-timeout", "3")
    yield s
    rc = s.stop()
    assert rc == 0, f"the server exited with {rc}:\n{s.stderr()}"


@pytest.fixture(scope="session")
def tiny_engine():
    import decodekit

    return decodekit.load(TINY, device="cpu")
