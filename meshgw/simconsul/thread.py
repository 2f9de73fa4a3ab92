"""`SimConsulThread`: a `SimConsul` on its own loop in a background thread, for synchronous
tests and for callers (the demo, a child process) that do not run the server's loop."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from meshgw.simconsul.server import SimConsul

T = TypeVar("T")


class SimConsulThread:
    """Start with `start()` or `with SimConsulThread(...) as sim:`. The parts are reached
    through `sim` (or directly: unknown attributes are forwarded, so `runner.catalog` works);
    `down()`/`up()` are synchronous here."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        self._start_args: dict[str, Any] = {
            "host": host,
            "port": port,
            "unix_path": unix_path,
            "ssl_context": ssl_context,
        }
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.sim: SimConsul | None = None

    def start(self) -> SimConsulThread:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="simconsul", daemon=True)
        self._thread.start()
        ready.wait()

        async def make() -> SimConsul:
            return await SimConsul(**self._kwargs).start(**self._start_args)

        self.sim = self._call(make())
        return self

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is None:
            return
        if self.sim is not None:
            self._call(self.sim.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def down(self) -> None:
        assert self.sim is not None
        self._call(self.sim.down())

    def up(self) -> None:
        assert self.sim is not None
        self._call(self.sim.up())

    @property
    def url(self) -> str:
        assert self.sim is not None
        return self.sim.url

    def __getattr__(self, name: str) -> Any:
        sim = self.__dict__.get("sim")
        if sim is None:
            raise AttributeError(name)
        return getattr(sim, name)

    def __enter__(self) -> SimConsulThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
