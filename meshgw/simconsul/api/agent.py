"""/v1/agent/*: the agent's identity, service registration, and its view of its services."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from meshgw.simconsul.acl import Access, require
from meshgw.simconsul.api.common import DEFAULT_WAIT, MAX_WAIT, BaseAPI, HTTPAnswer
from meshgw.simconsul.bexpr import AGENT_SERVICE
from meshgw.simconsul.golang import parse_go_duration
from meshgw.simconsul.registration import (
    DecodeError,
    decode_registration,
    multierror,
    validate_check,
    validate_node_service,
    validate_service_meta,
)
from meshgw.simconsul.shapes import CONSUL_VERSION, Json


class AgentAPI(BaseAPI):
    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/agent/self", self.self_)
        app.router.add_put("/v1/agent/service/register", self.register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self.deregister)
        app.router.add_get("/v1/agent/services", self.services)
        app.router.add_get("/v1/agent/service/{id}", self.service)

    async def self_(self, request: web.Request) -> web.Response:
        agent = self.sim.agent
        require(self.token(request), "agent", Access.READ, agent.node_name)
        with self.sim.raft.lock:
            state = self.sim.catalog.dc()
            node = state.nodes[agent.node_name]
            body = self._self_body(node.json, agent.node_name in state.servers)
        return web.json_response(body)

    def _self_body(self, node: dict[str, Json], is_server: bool) -> dict[str, Json]:
        sim, agent = self.sim, self.sim.agent
        return {
            "Config": {
                "Datacenter": agent.datacenter,
                "PrimaryDatacenter": sim.primary_datacenter,
                "NodeName": agent.node_name,
                "NodeID": node["ID"],
                # netutil.IsDualStack reads this: an IPv6 bind address means dual-stack.
                "BindAddr": agent.bind_addr,
                "Revision": "2a5b8b9e",
                "Server": is_server,
                "Version": CONSUL_VERSION,
                "BuildDate": "2023-11-03T00:00:00Z",
            },
            "DebugConfig": {
                "Datacenter": agent.datacenter,
                "PrimaryDatacenter": sim.primary_datacenter,
                "NodeName": agent.node_name,
                "BindAddr": agent.bind_addr,
                "DNSDomain": sim.domain,
                "DNSAltDomain": "",
                "ServerMode": is_server,
                "ACLsEnabled": sim.acl.enabled,
                "ConnectEnabled": True,
                "ConnectMeshGatewayWANFederationEnabled": True,
                "PrimaryGateways": [],
                "PrimaryGatewaysInterval": "30s",
                "HTTPPort": sim.port if sim.listening else 8500,
                "GRPCPort": 8502,
            },
            "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
            "Member": {
                "Name": agent.node_name,
                "Addr": agent.node_address,
                "Port": 8301,
                "Tags": {
                    "build": f"{CONSUL_VERSION}:2a5b8b9e",
                    "dc": agent.datacenter,
                    "id": node["ID"],
                    "role": "consul" if is_server else "node",
                    "segment": "",
                    "vsn": "2",
                    "vsn_max": "3",
                    "vsn_min": "2",
                },
                "Status": 1,
                "ProtocolMin": 1,
                "ProtocolMax": 5,
                "ProtocolCur": 2,
                "DelegateMin": 2,
                "DelegateMax": 5,
                "DelegateCur": 4,
            },
            "Stats": {"consul": {"server": str(is_server).lower(), "version": CONSUL_VERSION}},
            "Meta": node["Meta"],
            "xDS": {
                "SupportedProxies": {"envoy": ["1.27.2"]},
                "Port": 8502,
                "Ports": {"Plaintext": 8502, "TLS": -1},
            },
        }

    async def register(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            args = decode_registration(json.loads(raw) if raw.strip() else {})
        except (ValueError, DecodeError) as exc:
            raise HTTPAnswer(400, f"Request decode failed: {exc}") from None
        name = args.get("Name") or ""
        if not name:
            raise HTTPAnswer(400, "Missing service name")
        if (args.get("Address") or "") in ("0.0.0.0", "::", "[::]"):
            raise HTTPAnswer(400, "Invalid service address")
        token = self.token(request)
        _validate(args)
        require(token, "service", Access.WRITE, name)
        sid = args.get("ID") or name
        agent = self.sim.agent
        with self.sim.raft.lock:
            existing = agent.services.get(sid)
            if existing is not None:
                require(token, "service", Access.WRITE, existing.service["Service"])
            if args.get("Kind") == "connect-proxy":
                require(token, "service", Access.WRITE, args["Proxy"]["DestinationServiceName"])
            replace = request.query.get("replace-existing-checks", None)
            agent.register(args, replace_checks=replace is not None and replace in ("", "true"))
        return web.Response(status=200)

    async def deregister(self, request: web.Request) -> web.Response:
        sid = request.match_info["id"]
        token = self.token(request)
        agent = self.sim.agent
        with self.sim.raft.lock:
            entry = agent.services.get(sid)
            if entry is None:
                if self.sim.deregister_unknown_404:
                    raise HTTPAnswer(
                        404,
                        f'Unknown service ID "{sid}". Ensure that the service ID is passed, '
                        "not the service name.",
                    )
                return web.Response(status=200)
            require(token, "service", Access.WRITE, entry.service["Service"])
            agent.deregister(sid)
        return web.Response(status=200)

    async def services(self, request: web.Request) -> web.Response:
        token = self.token(request)
        expr = self.filter(request, AGENT_SERVICE, rpc=False)
        agent = self.sim.agent
        with self.sim.raft.lock:
            out = {
                sid: agent.render(sid)
                for sid, entry in sorted(agent.services.items())
                if token is None or token.allows("service", Access.READ, entry.service["Service"])
            }
        if expr is not None:
            out = {k: v for k, v in out.items() if expr.matches(v)}
        return web.json_response(out)

    async def service(self, request: web.Request) -> web.Response:
        """One service, hash-blocking: with ?hash=H, wait until its ContentHash differs."""
        sid = request.match_info["id"]
        token = self.token(request)
        wanted = request.query.get("hash", "")
        wait = DEFAULT_WAIT
        if "wait" in request.query:
            try:
                wait = min(parse_go_duration(request.query["wait"]), MAX_WAIT)
            except ValueError:
                raise HTTPAnswer(400, "Invalid wait time") from None
        raft = self.sim.raft
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            event = raft.signal.event
            with raft.lock:
                entry = self.sim.agent.services.get(sid)
                if entry is None:
                    raise HTTPAnswer(404, f"unknown service ID: {sid}")
                require(token, "service", Access.READ, entry.service["Service"])
                body = self.sim.agent.render(sid, with_hash=True)
                assert body is not None
            remaining = deadline - loop.time()
            if not wanted or body["ContentHash"] != wanted or remaining <= 0:
                break
            raft.park(1)  # counted like the index-blocking queries, for tests to wait on
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                pass
            finally:
                raft.park(-1)
        return web.json_response(body, headers={"X-Consul-ContentHash": body["ContentHash"]})


def _validate(args: dict[str, Json]) -> None:
    """The agent's checks on a registration body, in its order, with its texts."""
    weights = args.get("Weights")
    if weights is not None:
        if weights.get("Passing", 0) < 1:
            raise HTTPAnswer(400, "Invalid Weights: Passing must be greater than 0")
        if weights.get("Warning", 0) < 0:
            raise HTTPAnswer(400, "Invalid Weights: Warning must be greater or equal than 0")
    meta_error = validate_service_meta(args.get("Kind") or "", args.get("Meta") or {})
    if meta_error:
        raise HTTPAnswer(400, f"Invalid Service Meta: {meta_error}")
    errors = validate_node_service(args)
    if errors:
        raise HTTPAnswer(400, f"Validation failed: {multierror(errors)}")
    defs = [*([args["Check"]] if args.get("Check") else []), *(args.get("Checks") or [])]
    for check in defs:
        problem = validate_check(check)
        if problem:
            raise HTTPAnswer(400, f"Invalid check: {problem}")
        if check.get("Status") and check["Status"] not in ("passing", "warning", "critical"):
            raise HTTPAnswer(400, "Status for checks must 'passing', 'warning', 'critical'")
