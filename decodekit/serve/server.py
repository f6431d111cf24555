"""uvicorn's server, announcing itself once it listens, and treating Ctrl-C / SIGTERM as the normal end."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import uvicorn


class Server(uvicorn.Server):
    """After a signal, uvicorn shuts down gracefully (in-flight requests get `timeout_graceful_shutdown` seconds,
    then the app's lifespan ends) and then re-raises the signal, which would end the process with a KeyboardInterrupt
    or a SIGTERM status. Here the graceful shutdown is the expected end: `run` returns and the process exits 0."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()  # handled: do not re-raise
