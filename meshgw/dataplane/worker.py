"""One worker process: a Listener on the shared port, steered by the supervisor.

It answers the supervisor's requests (messages.py) in order. Ctrl-C and SIGTERM are the
supervisor's to handle: a worker drains when told, or on its own when the supervisor is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

from prometheus_client import generate_latest

from meshgw import logs
from meshgw.dataplane import messages as m
from meshgw.dataplane.listener import Listener
from meshgw.metrics import Metrics
from meshgw.routing import RouteTable

CHANNEL_FD_ENV = "MESHGW_X_WORKER_FD"  # plumbing, not a setting (settings.py)
ORPHAN_DRAIN_TIMEOUT = 30.0  # the supervisor is gone: finish what is open, then leave


class Worker:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.listener: Listener | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        try:
            while True:
                try:
                    message = await m.receive(self.reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    await self._drain(m.Drain(ORPHAN_DRAIN_TIMEOUT), answer=False)
                    return
                if not await self.handle(message):
                    return
        finally:
            if self.listener is not None:
                self.listener.close()

    async def handle(self, message: m.Message) -> bool:
        """Act on one message; False when the worker is done."""
        listener = self.listener
        match message:
            case m.Start():
                return await self._start(message)
            case m.NewTable(topology) if listener is not None:
                listener.set_table(RouteTable.build(topology))
            case m.CountOpen() if listener is not None:
                await m.send(self.writer, m.OpenCount(await listener.open_connections()))
            case m.Scrape() if listener is not None:
                await m.send(self.writer, m.Scraped(generate_latest(listener.metrics.registry)))
            case m.DownNow() if listener is not None:
                await m.send(self.writer, m.DownEndpoints(await listener.down_endpoints()))
            case m.StopAccepting() if listener is not None:
                listener.stop_accepting()
                await m.send(self.writer, m.Stopped())
            case m.Drain():
                await self._drain(message, answer=True)
                return False
        return True

    async def _start(self, start: m.Start) -> bool:
        logs.configure(start.log_format, start.log_level, worker=start.index)
        listener = Listener(
            asyncio.get_running_loop(),
            start.config,
            RouteTable.build(start.topology),
            start.host,
            start.port,
            metrics=Metrics(),
            reuse_port=True,
        )
        try:
            listener.start()
        except OSError as error:
            await m.send(self.writer, m.Failed(error.errno or 0, error.strerror or str(error)))
            return False
        self.listener = listener
        listener.set_demand(self._demand)
        await m.send(self.writer, m.Listening(listener.port))
        return True

    def _demand(self, service: str) -> None:
        task = asyncio.get_running_loop().create_task(m.send(self.writer, m.Demand(service)))
        self.tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self.tasks.discard)

    async def _drain(self, drain: m.Drain, answer: bool) -> None:
        closed = await self.listener.drain(drain.timeout) if self.listener is not None else 0
        if answer:
            with contextlib.suppress(ConnectionError):
                await m.send(self.writer, m.Drained(closed))


async def _main(fd: int) -> None:
    # The supervisor decides when to stop: a Ctrl-C to the process group must not cut
    # connections short, and SIGTERM to the supervisor reaches workers as a Drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    await Worker(reader, writer).serve()


def main() -> None:
    import uvloop

    uvloop.run(_main(int(os.environ[CHANNEL_FD_ENV])))


if __name__ == "__main__":
    main()
