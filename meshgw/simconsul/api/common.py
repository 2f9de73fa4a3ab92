"""What every HTTP handler shares: token and datacenter resolution, query flags, QueryMeta
headers, and blocking queries (``?index=&wait=``) with Consul's defaults and jitter."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from meshgw.simconsul.acl import AclToken
from meshgw.simconsul.bexpr import Filter, FilterError, Struct
from meshgw.simconsul.catalog import Datacenter
from meshgw.simconsul.golang import parse_go_bool, parse_go_duration

if TYPE_CHECKING:
    from meshgw.simconsul.server import SimConsul

# Consul's defaults: default_query_time 300s, max_query_time 600s, jitter up to wait/16.
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
JITTER_FRACTION = 16


class HTTPAnswer(Exception):
    """Raised inside handlers to answer with Consul's plain-text error format."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(slots=True)
class Answer:
    """What a blocking view found: its index, the JSON body, and whether ACLs filtered it.
    `missing` answers 404 with that text (and the QueryMeta headers), as config entries do."""

    index: int
    body: Any
    filtered: bool = False
    missing: str | None = None


View = Callable[[], Answer]


class BaseAPI:
    def __init__(self, sim: SimConsul) -> None:
        self.sim = sim

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def token(self, request: web.Request) -> AclToken | None:
        return self.sim.acl.resolve(request.headers, request.query)

    def target_dc(self, request: web.Request) -> Datacenter:
        dc = request.query.get("dc") or self.sim.catalog.local_dc
        state = self.sim.catalog.find_dc(dc)
        if state is None:
            raise HTTPAnswer(500, "No path to datacenter")
        return state

    @staticmethod
    def filter(request: web.Request, kind: Struct, *, rpc: bool = True) -> Filter | None:
        """?filter= checked against the filtered type. Consul answers a bad expression with 500:
        the servers refuse it in the RPC a client agent forwards (consul#7338, consul#9441)."""
        try:
            return Filter.parse(request.query.get("filter", ""), kind)
        except FilterError as exc:
            raise HTTPAnswer(500, ("rpc error making call: " if rpc else "") + str(exc)) from None

    @staticmethod
    def flag(request: web.Request, name: str) -> bool:
        if name not in request.query:
            return False
        value = request.query.get(name, "")
        if value == "":
            return True
        try:
            return parse_go_bool(value)
        except ValueError:
            raise HTTPAnswer(400, f"Invalid value for ?{name}") from None

    def query_meta(self, state: Datacenter, request: web.Request, index: int) -> dict[str, str]:
        known = state.has_leader
        stale = "stale" in request.query
        if not known and not stale:
            raise HTTPAnswer(500, "No cluster leader")
        headers = {
            "X-Consul-Index": str(index),
            "X-Consul-KnownLeader": "true" if known else "false",
            "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": "stale" if stale else "leader",
        }
        if self.sim.acl.enabled:
            headers["X-Consul-Default-ACL-Policy"] = "deny"
        return headers

    def _wait_seconds(self, request: web.Request) -> tuple[int, float]:
        query = request.query
        min_index = 0
        if "index" in query:
            try:
                min_index = int(query["index"])
                if min_index < 0:
                    raise ValueError
            except ValueError:
                raise HTTPAnswer(400, "Invalid index") from None
        wait = DEFAULT_WAIT
        if "wait" in query:
            try:
                wait = parse_go_duration(query["wait"])
            except ValueError:
                raise HTTPAnswer(400, "Invalid wait time") from None
        wait = min(max(wait, 0.0), MAX_WAIT) or DEFAULT_WAIT
        if self.sim.jitter:
            wait += random.uniform(0, wait / JITTER_FRACTION)
        return min_index, wait

    async def blocking(
        self, request: web.Request, view: View, state: Datacenter | None = None
    ) -> web.Response:
        """Answer `view` as a blocking query: with ?index=N, wait until the view's index passes N
        or `wait` (+ up to wait/16 jitter) runs out."""
        min_index, wait = self._wait_seconds(request)
        raft = self.sim.raft
        loop = raft.signal.loop
        assert loop is not None
        deadline = loop.time() + wait
        while True:
            event = raft.signal.event
            with raft.lock:
                answer = view()
                text = json.dumps(answer.body)
            remaining = deadline - loop.time()
            if min_index == 0 or answer.index > min_index or remaining <= 0 or self.sim.stopping:
                break
            raft.park(+1)
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                pass
            finally:
                raft.park(-1)
        headers = self.query_meta(state or self.sim.catalog.dc(), request, answer.index)
        if answer.filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        if answer.missing is not None:
            return web.Response(
                status=404, text=answer.missing, headers=headers, content_type="text/plain"
            )
        return web.Response(text=text, headers=headers, content_type="application/json")
