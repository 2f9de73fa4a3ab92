"""The control plane's watches: one way to follow a blocking endpoint, and how each fares.

Consul down or answering nonsense never clears what is known: a watch keeps its last good answer,
says once in the log (and in `meshgw_consul_up{source}`) when it starts or stops failing, and
retries with backoff. An answer its handler cannot use is logged and the watch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from meshgw.control import catalog
from meshgw.control.consul.blocking import Backoff, BlockingQuery, RateLimit
from meshgw.control.consul.client import ConsulClient, Response
from meshgw.control.consul.errors import ConsulForbidden, ConsulNotFound

log = logging.getLogger("meshgw.discovery")

Params = dict[str, str | int | bool | None]


@dataclass
class SourceHealth:
    """How one source (a watch, or the agent probe) fares, for /v1/topology."""

    ok: bool = False
    last_ok: float | None = None  # time.time() of the last good answer
    error: str | None = None
    index: int = 0

    def to_json(self, now: float) -> dict[str, Any]:
        age = None if self.last_ok is None else round(now - self.last_ok, 3)
        state = "ok" if self.ok else "failing"
        return {"state": state, "last_answer_age_s": age, "error": self.error, "index": self.index}


@dataclass(frozen=True)
class WatchOptions:
    wait: str | float = "5m"
    rate_limit: RateLimit = RateLimit()
    backoff: Backoff = Backoff()


class Watches:
    """The watch tasks of one Consul client, their health, and what happens on change."""

    def __init__(
        self,
        client: ConsulClient,
        changed: Callable[[], None],
        *,
        options: WatchOptions | None = None,
        on_health: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.client = client
        self.changed = changed
        self.options = options or WatchOptions()
        self.on_health = on_health
        self.health: dict[str, SourceHealth] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run `coroutine` as the watch `name` (replacing one of that name)."""
        self.stop(name)
        self.tasks[name] = asyncio.get_running_loop().create_task(coroutine, name=name)

    def running(self, name: str) -> bool:
        return name in self.tasks

    def stop(self, name: str) -> None:
        task = self.tasks.pop(name, None)
        if task is not None:
            task.cancel()
        self.health.pop(name, None)

    def names(self, prefix: str) -> list[str]:
        return [name for name in self.tasks if name.startswith(prefix)]

    def pending(self) -> list[str]:
        """The watches started that have neither answered nor failed yet. A handler that starts
        watches does so before its step of the loop ends, so between steps an empty list means
        that every source answered (or failed) at least once, those it led to included."""
        return [name for name in self.tasks if name not in self.health]

    async def stop_all(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()

    def follow(
        self,
        name: str,
        path: str,
        handle: Callable[[Response], None],
        *,
        dc: str | None = None,
        params: Params | None = None,
        missing: Callable[[], None] | None = None,
    ) -> None:
        """Start watch `name`: follow `path` and hand each new answer to `handle`. With
        `missing`, a 404 (a config entry that does not exist) is an answer too."""
        self.start(name, self._follow(name, path, handle, dc, params, missing))

    async def _follow(
        self,
        name: str,
        path: str,
        handle: Callable[[Response], None],
        dc: str | None,
        params: Params | None,
        missing: Callable[[], None] | None,
    ) -> None:
        options = self.options
        query = BlockingQuery(
            self.client,
            path,
            params=params,
            dc=dc,
            wait=options.wait,
            rate_limit=options.rate_limit,
            backoff=options.backoff,
            on_error=lambda error, _failures, _delay: self._on_error(name, error, missing),
            on_recover=lambda _failures: self.recovered(name),
        )
        async for answer in query:
            self.recovered(name, answer.index)
            try:
                handle(answer)
            except catalog.CatalogError as error:
                # Consul answered, but not in the documented shape: keep the last good view.
                log.error("ignoring an answer from Consul: %s", error)
                continue
            except Exception:
                log.exception("cannot use the answer to %s; keeping the last good view", name)
                continue
            self.changed()

    def _on_error(self, name: str, error: Exception, missing: Callable[[], None] | None) -> None:
        if missing is not None and isinstance(error, ConsulNotFound):
            self.recovered(name)
            missing()
            self.changed()
            return
        self.failed(name, error)

    def failed(self, source: str, error: Exception) -> None:
        if self.on_health is not None:
            self.on_health(source, False)
        health = self.health.setdefault(source, SourceHealth())
        failing_already = health.error is not None
        health.ok, health.error = False, str(error)
        if failing_already:
            return  # said once, when it began
        if isinstance(error, ConsulForbidden):
            log.error("Consul refused %s: %s", source, error)
        else:
            log.warning("Consul unavailable for %s, keeping what is known: %s", source, error)

    def recovered(self, source: str, index: int | None = None) -> None:
        if self.on_health is not None:
            self.on_health(source, True)
        health = self.health.setdefault(source, SourceHealth())
        if health.error is not None:
            log.info("Consul answers %s again", source)
        health.ok, health.error, health.last_ok = True, None, time.time()
        if index is not None:
            health.index = index

    def status(self) -> dict[str, Any]:
        """Each source's state and the age of its last good answer; every source is stale
        while the agent itself does not answer."""
        now = time.time()
        agent = self.health.get("agent")
        stale = agent is not None and not agent.ok
        return {
            name: {**health.to_json(now), "stale": stale or not health.ok}
            for name, health in sorted(self.health.items())
        }
