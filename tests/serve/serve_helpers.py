"""A real `decodekit serve` process on a free loopback port (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time

TINY = "random:tiny-llama"


class ServerProcess:
    """`decodekit serve ARGS --port 0` in a subprocess; `url` is the /v1 base it printed once warm."""

    def __init__(self, *args: str, start_timeout: float = 120.0) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")  # stderr: read back when something fails
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "decodekit.cli", "serve", "--device", "cpu",
                                      "--port", "0", *args], stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        deadline = time.monotonic() + start_timeout
        line = ""
        while "serving" not in line:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"the server did not start:\n{self.stderr()}")
            if select.select([self.proc.stdout], [], [], min(left, 1.0))[0]:
                line = self.proc.stdout.readline()
        self.url = line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        self.base = self.url.removesuffix("/v1")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int:
        """Ask it to shut down; its exit status (killed after `timeout`: then -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
