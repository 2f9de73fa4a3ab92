"""/v1/config: config entries (write, read, list, delete), with Consul's permissions per kind,
its 400/404/500 texts, check-and-set and blocking reads; and /v1/discovery-chain, the chain
compiled from them."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from meshgw.simconsul.acl import Access, AclToken, require
from meshgw.simconsul.api.common import Answer, BaseAPI, HTTPAnswer
from meshgw.simconsul.config_entries import KEY
from meshgw.simconsul.config_kinds import (
    KINDS,
    OTHER_KINDS,
    EntryError,
    decode_entry,
    read_permission,
    write_permission,
)
from meshgw.simconsul.discovery_chain import ChainError, compile_chain
from meshgw.simconsul.golang import parse_go_duration

RPC_ERROR = "rpc error making call: "


class ConfigAPI(BaseAPI):
    def routes(self, app: web.Application) -> None:
        app.router.add_put("/v1/config", self.apply)
        app.router.add_get("/v1/config/{kind}", self.listing)
        app.router.add_get("/v1/config/{kind}/{name}", self.read)
        app.router.add_delete("/v1/config/{kind}/{name}", self.delete)
        app.router.add_route("*", "/v1/config/{kind}/{name}", self.not_allowed)
        app.router.add_get("/v1/discovery-chain/{service}", self.chain)
        app.router.add_post("/v1/discovery-chain/{service}", self.chain)

    async def apply(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            entry = decode_entry(json.loads(raw) if raw.strip() else None)
        except (ValueError, EntryError) as exc:
            raise HTTPAnswer(400, f"Request decoding failed: {exc}") from None
        resource, name = write_permission(entry["Kind"], entry.get("Name", ""))
        require(self.token(request), resource, Access.WRITE, name)
        try:
            written = self.sim.config.apply(entry, cas=_cas(request))
        except EntryError as exc:
            raise HTTPAnswer(500, RPC_ERROR + str(exc)) from None
        return web.json_response(written)

    async def listing(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        kind = _kind(request)
        token = self.token(request)
        config = self.sim.config

        def view() -> Answer:
            entries = config.list(kind)
            visible = [e for e in entries if _readable(token, kind, e["Name"])]
            return Answer(self.sim.raft.view(KEY), visible, len(visible) != len(entries))

        return await self.blocking(request, view, state)

    async def read(self, request: web.Request) -> web.Response:
        state = self.target_dc(request)
        kind, name = _kind(request), request.match_info["name"]
        permission = read_permission(kind, name)
        if permission is not None:
            require(self.token(request), permission[0], Access.READ, permission[1])
        else:
            self.token(request)  # an unknown token is refused all the same
        config = self.sim.config
        missing = f'Config entry not found for "{kind}" / "{name}"'

        def view() -> Answer:
            entry = config.get(kind, name)
            return Answer(self.sim.raft.view(KEY), entry, missing=None if entry else missing)

        return await self.blocking(request, view, state)

    async def delete(self, request: web.Request) -> web.Response:
        kind, name = request.match_info["kind"], request.match_info["name"]
        if kind not in KINDS + OTHER_KINDS:
            raise HTTPAnswer(400, f"invalid config entry kind: {kind}")
        resource, target = write_permission(kind, name)
        require(self.token(request), resource, Access.WRITE, target)
        cas = _cas(request)
        deleted = self.sim.config.delete(kind, name, cas=cas)
        # The boolean for check-and-set deletes only, as Consul keeps older callers working.
        return web.json_response(deleted if cas is not None else {})

    async def chain(self, request: web.Request) -> web.Response:
        """The compiled chain; POST carries overrides (OverrideProtocol, OverrideConnectTimeout,
        OverrideMeshGateway) in its body, GET none."""
        state = self.target_dc(request)
        service = request.match_info["service"]
        require(self.token(request), "service", Access.READ, service)
        compile_dc = request.query.get("compile-dc") or state.name
        overrides = await _overrides(request)
        sim = self.sim

        def view() -> Answer:
            try:
                chain = compile_chain(
                    sim.config, service, compile_dc, sim.ca.trust_domain, overrides=overrides
                )
            except ChainError as exc:
                raise HTTPAnswer(500, RPC_ERROR + str(exc)) from None
            return Answer(sim.raft.view(KEY), {"Chain": chain})

        return await self.blocking(request, view, state)

    async def not_allowed(self, request: web.Request) -> web.Response:
        raise HTTPAnswer(405, f"method {request.method} not allowed")


async def _overrides(request: web.Request) -> dict[str, Any]:
    if request.method != "POST":
        return {}
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else {}
        out: dict[str, Any] = {}
        if body.get("OverrideProtocol"):
            out["OverrideProtocol"] = str(body["OverrideProtocol"])
        if body.get("OverrideConnectTimeout"):
            out["OverrideConnectTimeout"] = parse_go_duration(str(body["OverrideConnectTimeout"]))
        if (body.get("OverrideMeshGateway") or {}).get("Mode"):
            out["OverrideMeshGateway"] = {"Mode": body["OverrideMeshGateway"]["Mode"]}
    except (ValueError, AttributeError) as exc:
        raise HTTPAnswer(400, f"Request decode failed: {exc}") from None
    return out


def _kind(request: web.Request) -> str:
    kind = request.match_info["kind"]
    if kind not in KINDS + OTHER_KINDS:
        raise HTTPAnswer(500, f"{RPC_ERROR}invalid config entry kind: {kind}")
    return kind


def _cas(request: web.Request) -> int | None:
    if "cas" not in request.query:
        return None
    try:
        return int(request.query["cas"])
    except ValueError:
        text = f'strconv.ParseUint: parsing "{request.query["cas"]}": invalid syntax'
        raise HTTPAnswer(500, text) from None


def _readable(token: AclToken | None, kind: str, name: str) -> bool:
    permission = read_permission(kind, name)
    if permission is None or token is None:
        return True
    return token.allows(permission[0], Access.READ, permission[1])
