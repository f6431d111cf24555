"""`decodekit serve` refuses bad flags in one line, before loading anything heavy or binding a port."""
from __future__ import annotations

import socket

import pytest

from decodekit.cli import main


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--max-running", "0"], "--max-running must be >= 1"),
    (["--request-timeout", "0"], "--request-timeout must be > 0"),
    (["--method", "telepathy"], "unknown method 'telepathy'"),
    (["-O", "num_draft"], "is not KEY=VALUE"),
    (["--method", "pld", "-O", "num_draft=0"], "num_draft must be >= 1"),
])
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    assert main(["serve", "--model", "random:tiny-llama", "--device", "cpu", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("decodekit: error:") and message in err and "\n" not in err


def test_a_taken_port_is_a_one_line_error(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "random:tiny-llama", "--device", "cpu", "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
