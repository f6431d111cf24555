"""Ctrl-C (SIGINT) or SIGTERM: requests in flight finish (or, past --shutdown-timeout, are cancelled), then the
process exits 0."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from serve_helpers import TINY, ServerProcess


def stream_lines(url: str, body: dict, lines: list, started: threading.Event) -> None:
    try:
        with httpx.stream("POST", url + "/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()
    except httpx.HTTPError as e:
        lines.append(f"error: {type(e).__name__}")
    started.set()


def test_sigint_lets_the_request_in_flight_finish_and_exits_0():
    server = ServerProcess("--model", TINY)
    try:
        lines: list[str] = []
        started = threading.Event()
        body = {"model": TINY, "prompt": "Go on:", "max_tokens": 600, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        reader = threading.Thread(target=stream_lines, args=(server.url, body, lines, started))
        reader.start()
        assert started.wait(30)
        server.proc.send_signal(signal.SIGINT)
        reader.join(60)
        assert server.proc.wait(60) == 0, server.stderr()
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 600  # it ran to the end
    finally:
        server.kill()


def test_past_the_shutdown_timeout_requests_are_cancelled_and_it_still_exits_0():
    server = ServerProcess("--model", TINY, "--max-running", "1", "--shutdown-timeout", "1")
    try:
        lines: list[str] = []
        started = threading.Event()
        body = {"model": TINY, "prompt": "Go on:", "max_tokens": 2000, "n": 8, "ignore_eos": True, "stream": True}
        reader = threading.Thread(target=stream_lines, args=(server.url, body, lines, started))
        reader.start()
        assert started.wait(30)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.stderr()
        assert time.monotonic() - t0 < 15
        reader.join(30)
        assert "data: [DONE]" not in lines  # cut short
    finally:
        server.kill()
