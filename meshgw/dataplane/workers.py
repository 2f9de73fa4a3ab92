"""N worker processes accepting on one port with SO_REUSEPORT; the supervisor steers them.

The supervisor owns the control plane and the admin face. Each worker (worker.py) runs its own
event loop and Listener and gets, over a private socketpair, every new topology (it builds the
route table itself), requests for its open connections and metrics, and the orders to stop
accepting and to drain (messages.py). A worker whose supervisor disappears drains and exits
on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from meshgw.dataplane import messages as m
from meshgw.dataplane.context import DataPlaneConfig, pump_mode
from meshgw.dataplane.worker import CHANNEL_FD_ENV
from meshgw.metrics import Metrics
from meshgw.routing import RouteTable

log = logging.getLogger("meshgw.workers")

ReplyT = TypeVar("ReplyT", bound=m.Reply)


class WorkerStartError(Exception):
    """A worker process could not be started at all (not a listen error: those are OSError)."""


class WorkerHandle:
    """The supervisor's handle on one worker process.

    One reader task takes everything the worker says: replies go to the request waiting for
    them (one at a time), demands to `on_demand`.
    """

    def __init__(
        self, index: int, failures: int = 0, on_demand: Callable[[str], None] | None = None
    ) -> None:
        self.index = index
        self.failures = failures  # predecessors in a row that died young
        self.on_demand = on_demand
        self.started = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()  # one request in flight per worker
        self.replies: asyncio.Queue[m.Reply | None] = asyncio.Queue()
        self.reading: asyncio.Task[None] | None = None

    async def start(self, start: m.Start) -> int:
        """Start the process; the port it listens on, or the OSError it met."""
        self.started = asyncio.get_running_loop().time()
        ours, theirs = socket.socketpair()
        env = {**os.environ, CHANNEL_FD_ENV: str(theirs.fileno())}
        command = [sys.executable, "-m", "meshgw.dataplane.worker"]
        try:
            self.proc = subprocess.Popen(command, pass_fds=[theirs.fileno()], env=env)
        except OSError as error:
            raise WorkerStartError(
                f"cannot start worker process {' '.join(command)}: {error.strerror or error}"
            ) from None
        finally:
            theirs.close()
        reader, self.writer = await asyncio.open_connection(sock=ours)
        self.reading = asyncio.get_running_loop().create_task(self._read(reader))
        try:
            reply = await self.request(start, m.Listening | m.Failed)  # type: ignore[arg-type]
        except ConnectionError:
            status = await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)
            raise WorkerStartError(
                f"worker process {self.index} exited (status {status}) before listening; "
                "its error is above"
            ) from None
        if isinstance(reply, m.Failed):
            raise OSError(reply.errno, reply.strerror)
        return reply.port

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await m.receive(reader)
                if isinstance(message, m.Demand):
                    if self.on_demand is not None:
                        self.on_demand(message.service)
                else:
                    self.replies.put_nowait(message)  # type: ignore[arg-type]
        except (asyncio.IncompleteReadError, ConnectionError):
            self.replies.put_nowait(None)  # the worker is gone: whoever waits learns it

    async def request(self, message: m.Request, expect: type[ReplyT]) -> ReplyT:
        assert self.writer is not None
        async with self.lock:
            await m.send(self.writer, message)
            reply = await self.replies.get()
        if reply is None:
            self.replies.put_nowait(None)  # and so does the next one
            raise ConnectionError(f"worker {self.index} is gone")
        if not isinstance(reply, expect):
            raise ConnectionError(f"worker {self.index} answered {reply!r} to {message!r}")
        return reply

    async def tell(self, message: m.Request) -> None:
        """Send without an answer; to a worker that died meanwhile, nothing (its successor
        starts with the current state)."""
        async with self.lock:
            if self.writer is not None:
                with contextlib.suppress(ConnectionError):
                    await m.send(self.writer, message)

    async def wait(self, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, proc.wait), timeout)
        except TimeoutError:
            proc.kill()
            await loop.run_in_executor(None, proc.wait)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.reading is not None:
            self.reading.cancel()


class WorkerPool:
    """A DataPlaneService made of worker processes.

    A worker that dies (killed, out of memory) is noticed at once through a pidfd in the event
    loop, logged, counted and started again with the current route table; one that keeps dying
    is started again less and less often.
    """

    def __init__(
        self,
        config: DataPlaneConfig,
        table: RouteTable,
        host: str,
        port: int,
        n: int,
        log_settings: tuple[str, str] = ("text", "info"),
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.log_settings = log_settings
        self.table = table
        self.host, self.port = host, port
        self.demand: Callable[[str], None] | None = None
        self.workers = [WorkerHandle(i + 1, on_demand=self._demand) for i in range(n)]
        self.listening = False
        self.pump_mode = pump_mode(config.pump)  # what each worker will find, as they do
        self.supervisor_metrics = metrics
        self.draining = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._replacing: set[asyncio.Task[None]] = set()

    def _start_message(self, worker: WorkerHandle) -> m.Start:
        log_format, log_level = self.log_settings
        # What holds for every worker (a pump mode falling back) is logged by the first.
        config = dataclasses.replace(self.config, announce=worker.index == 1)
        return m.Start(
            worker.index, config, self.table.topology, self.host, self.port,
            log_format, log_level,
        )  # fmt: skip

    async def start(self) -> None:
        # The first worker binds (maybe port 0); the others join the port it got.
        for worker in self.workers:
            self.port = await worker.start(self._start_message(worker))
            self._watch(worker)
        self.listening = True

    def _watch(self, worker: WorkerHandle) -> None:
        assert worker.proc is not None
        if not hasattr(os, "pidfd_open"):  # Linux < 5.3: dead workers are not replaced
            return
        pidfd = os.pidfd_open(worker.proc.pid)
        asyncio.get_running_loop().add_reader(pidfd, self._exited, worker, pidfd)

    def _exited(self, worker: WorkerHandle, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        assert worker.proc is not None
        status = worker.proc.wait()  # it has exited: this only reaps it
        worker.close()
        if self.draining:
            return
        how = f"killed by {signal.Signals(-status).name}" if status < 0 else f"status {status}"
        log.error(
            "worker %d (pid %d) died (%s): starting another", worker.index, worker.proc.pid, how
        )
        if self.supervisor_metrics is not None:
            self.supervisor_metrics.worker_restarts.inc()
        task = loop.create_task(self._replace(worker))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, dead: WorkerHandle) -> None:
        # A worker that lived a while is replaced at once; one that keeps dying young, after
        # a growing pause (at most a minute), so a crash loop does not become a fork loop.
        lived = asyncio.get_running_loop().time() - dead.started
        failures = dead.failures + 1 if lived < 10.0 else 0
        await asyncio.sleep(min(60.0, 0.5 * (2**failures - 1)))
        worker = WorkerHandle(dead.index, failures, on_demand=self._demand)
        self.workers[self.workers.index(dead)] = worker
        try:
            await worker.start(self._start_message(worker))
        except (OSError, ConnectionError, asyncio.IncompleteReadError, WorkerStartError) as error:
            log.error("worker %d could not start: %s", worker.index, error)
        except asyncio.CancelledError:
            if worker.proc is not None:  # the drain began while it was starting
                worker.proc.kill()
                worker.proc.wait()
            raise
        if worker.proc is not None:
            self._watch(worker)  # if it died already, this reports it and tries again

    def _running(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.writer is not None]

    async def _ask(
        self, workers: list[WorkerHandle], message: m.Request, expect: type[ReplyT]
    ) -> list[ReplyT]:
        """Each worker's answer to `message`; a worker that died meanwhile gives none."""
        replies = await asyncio.gather(
            *(w.request(message, expect) for w in workers), return_exceptions=True
        )
        return [reply for reply in replies if isinstance(reply, expect)]

    # --- DataPlaneService ---------------------------------------------------------------------

    async def open_connections(self) -> int:
        return sum(r.count for r in await self._ask(self._running(), m.CountOpen(), m.OpenCount))

    def set_table(self, table: RouteTable) -> None:
        self.table = table
        for worker in self.workers:
            self._spawn(worker.tell(m.NewTable(table.topology)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def extra_metrics(self) -> list[bytes]:
        return [r.text for r in await self._ask(self._running(), m.Scrape(), m.Scraped)]

    async def down_endpoints(self) -> dict[str, str]:
        down: dict[str, str] = {}
        for reply in await self._ask(self._running(), m.DownNow(), m.DownEndpoints):
            down.update(reply.down)
        return down

    def set_demand(self, demand: Callable[[str], None]) -> None:
        self.demand = demand

    def _demand(self, service: str) -> None:
        if self.demand is not None:
            self.demand(service)

    def stop_accepting(self) -> None:
        self.listening = False
        for worker in self._running():
            self._spawn(self._stop(worker))

    async def _stop(self, worker: WorkerHandle) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await worker.request(m.StopAccepting(), m.Stopped)

    async def drain(self, timeout: float) -> int:
        self.listening = False
        self.draining = True
        for task in self._replacing:
            task.cancel()
        running = self._running()
        closed = await self._ask(running, m.Drain(timeout), m.Drained)
        await asyncio.gather(*(w.wait(5.0) for w in running))
        return sum(r.closed for r in closed)
