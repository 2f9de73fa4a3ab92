"""N worker processes accepting on one port with SO_REUSEPORT; the supervisor steers them.

The supervisor owns the control plane and the admin face. Each worker runs its own event loop and
Listener and gets, over a private socketpair, every new topology (it builds the route table
itself), requests for its metrics text, and the order to drain. A worker whose supervisor
disappears drains and exits on its own.

Messages are length-prefixed pickles: both ends are this program, on a socketpair nobody else holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Coroutine, Iterable
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meshgw import logs
from meshgw.dataplane.context import DataPlaneConfig
from meshgw.dataplane.listener import Listener
from meshgw.metrics import Metrics
from meshgw.routing import RouteTable

log = logging.getLogger("meshgw.workers")
_HEADER = struct.Struct("!I")
CHANNEL_FD_ENV = "MESHGW_WORKER_FD"


async def send(writer: asyncio.StreamWriter, message: tuple[Any, ...]) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(body)) + body)
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))  # our own socketpair: trusted


class Worker:
    """The supervisor's handle on one worker process."""

    def __init__(self, index: int, failures: int = 0) -> None:
        self.index = index
        self.failures = failures  # predecessors in a row that died young
        self.started = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()  # one request in flight per worker

    async def start(self, init: tuple[Any, ...]) -> int:
        self.started = asyncio.get_running_loop().time()
        ours, theirs = socket.socketpair()
        env = {**os.environ, CHANNEL_FD_ENV: str(theirs.fileno())}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshgw.dataplane.workers"],
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        self.reader, self.writer = await asyncio.open_connection(sock=ours)
        reply = await self.request(init)
        if reply[0] != "listening":
            _, code, message = reply
            raise OSError(code, message)
        return int(reply[1])

    async def request(self, message: tuple[Any, ...]) -> tuple[Any, ...]:
        assert self.reader is not None and self.writer is not None
        async with self.lock:
            await send(self.writer, message)
            return await receive(self.reader)

    async def tell(self, message: tuple[Any, ...]) -> None:
        """Send without an answer; to a worker that died meanwhile, nothing (its successor
        starts with the current state)."""
        async with self.lock:
            if self.writer is not None:
                with contextlib.suppress(ConnectionError):
                    await send(self.writer, message)

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
        if self.writer is not None:
            self.writer.close()


class WorkerPool:
    """Looks like a Listener to the gateway: set_table, drain, address, connections.

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
        self.workers = [Worker(i + 1) for i in range(n)]
        self.listening = False
        self.pump_mode = config.pump
        self.supervisor_metrics = metrics
        self.draining = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._replacing: set[asyncio.Task[None]] = set()

    def _init_message(self) -> tuple[Any, ...]:
        return ("init", self.config, self.table.topology, self.host, self.port, self.log_settings)

    async def start(self) -> None:
        # The first worker binds (maybe port 0); the others join the port it got.
        for worker in self.workers:
            self.port = await worker.start(self._init_message())
            self._watch(worker)
        self.listening = True

    def _watch(self, worker: Worker) -> None:
        assert worker.proc is not None
        if not hasattr(os, "pidfd_open"):  # Linux < 5.3: dead workers are not replaced
            return
        pidfd = os.pidfd_open(worker.proc.pid)
        asyncio.get_running_loop().add_reader(pidfd, self._exited, worker, pidfd)

    def _exited(self, worker: Worker, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        assert worker.proc is not None
        status = worker.proc.wait()  # it has exited: this only reaps it
        if worker.writer is not None:
            worker.writer.close()
            worker.writer = None
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

    async def _replace(self, dead: Worker) -> None:
        # A worker that lived a while is replaced at once; one that keeps dying young, after
        # a growing pause (at most a minute), so a crash loop does not become a fork loop.
        lived = asyncio.get_running_loop().time() - dead.started
        failures = dead.failures + 1 if lived < 10.0 else 0
        await asyncio.sleep(min(60.0, 0.5 * (2**failures - 1)))
        worker = Worker(dead.index, failures)
        self.workers[self.workers.index(dead)] = worker
        try:
            await worker.start(self._init_message())
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as error:
            log.error("worker %d could not start: %s", worker.index, error)
        except asyncio.CancelledError:
            if worker.proc is not None:  # the drain began while it was starting
                worker.proc.kill()
                worker.proc.wait()
            raise
        if worker.proc is not None:
            self._watch(worker)  # if it died already, this reports it and tries again

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _running(self) -> list[Worker]:
        return [w for w in self.workers if w.writer is not None]

    async def _ask(self, workers: list[Worker], message: tuple[Any, ...]) -> list[Any]:
        """Each worker's answer to `message`; a worker that died meanwhile gives none."""
        replies = await asyncio.gather(
            *(w.request(message) for w in workers), return_exceptions=True
        )
        return [reply[1] for reply in replies if isinstance(reply, tuple)]

    async def open_connections(self) -> int:
        return sum(await self._ask(self._running(), ("open",)))

    def set_table(self, table: RouteTable) -> None:
        self.table = table
        for worker in self.workers:
            self._spawn(worker.tell(("table", table.topology)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def metrics(self) -> list[bytes]:
        return await self._ask(self._running(), ("metrics",))

    def stop_accepting(self) -> None:
        """Drain stops accepting first; a separate message is not needed."""

    async def drain(self, timeout: float) -> int:
        self.listening = False
        self.draining = True
        for task in self._replacing:
            task.cancel()
        running = self._running()
        closed = await self._ask(running, ("drain", timeout))
        await asyncio.gather(*(w.wait(5.0) for w in running))
        return sum(closed)


def merge_metrics(texts: Iterable[bytes], per_process_prefix: str = "process_") -> bytes:
    """Sum the samples of several registries; per-process families get a `worker` label."""
    Key = tuple[str, tuple[tuple[str, str], ...]]
    families: dict[str, tuple[str, str, dict[Key, float]]] = {}
    for index, text in enumerate(texts):
        for family in text_string_to_metric_families(text.decode()):
            _, _, values = families.setdefault(family.name, (family.type, family.documentation, {}))
            for sample in family.samples:
                labels = dict(sample.labels)
                if family.name.startswith(per_process_prefix):
                    labels["worker"] = str(index)
                key = (sample.name, tuple(sorted(labels.items())))
                if sample.name.endswith("_created"):  # the earliest creation time
                    values[key] = min(values.get(key, sample.value), sample.value)
                else:
                    values[key] = values.get(key, 0.0) + sample.value
    lines: list[str] = []
    for name, (kind, documentation, values) in families.items():
        lines.append(f"# HELP {name} {documentation}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, label_items), value in values.items():
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in label_items)
            lines.append(
                f"{sample_name}{{{rendered}}} {value!r}" if rendered else f"{sample_name} {value!r}"
            )
    return ("\n".join(lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# --- the worker process ------------------------------------------------------------------------


async def _worker_main(fd: int) -> None:
    # The supervisor decides when to stop: a Ctrl-C to the process group must not cut
    # connections short, and SIGTERM to the supervisor reaches workers as a drain message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    loop = asyncio.get_running_loop()
    listener: Listener | None = None
    try:
        while True:
            try:
                message = await receive(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                message = ("drain", 30.0)  # the supervisor is gone: finish and leave
                writer = None  # type: ignore[assignment]
            kind = message[0]
            if kind == "init":
                _, config, topology, host, port, (log_format, log_level) = message
                logs.configure(log_format, log_level)
                listener = Listener(
                    loop, config, RouteTable.build(topology), host, port,
                    metrics=Metrics(), reuse_port=True,
                )  # fmt: skip
                try:
                    listener.start()
                except OSError as error:
                    await send(writer, ("error", error.errno, error.strerror))
                    return
                await send(writer, ("listening", listener.port))
            elif kind == "table" and listener is not None:
                listener.set_table(RouteTable.build(message[1]))
            elif kind == "open" and listener is not None:
                await send(writer, ("open", await listener.open_connections()))
            elif kind == "metrics" and listener is not None:
                await send(writer, ("metrics", generate_latest(listener.metrics.registry)))
            elif kind == "drain":
                closed = await listener.drain(message[1]) if listener is not None else 0
                if writer is not None:
                    with contextlib.suppress(ConnectionError):
                        await send(writer, ("drained", closed))
                return
    finally:
        if listener is not None:
            listener.close()


def main() -> None:
    import uvloop

    uvloop.run(_worker_main(int(os.environ[CHANNEL_FD_ENV])))


if __name__ == "__main__":
    main()
