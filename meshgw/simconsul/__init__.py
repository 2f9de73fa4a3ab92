"""A simulated Consul agent API: the subset meshgw and its doctor use, with Consul's documented
JSON, status codes, blocking queries and ACL behaviour. For `meshgw demo` and for the tests.

What it models:

- one datacenter whose *agent* you talk to, plus any number of other datacenters reached with
  ``?dc=`` (an unknown one answers 500 "No path to datacenter", as Consul does);
- a catalog per datacenter (nodes, service instances, node and service checks), the agent's own
  registrations synced into it, and the federation states every leader publishes from its
  datacenter's mesh gateways (at once, or after ``anti_entropy_delay`` seconds);
- a raft-style index: every write bumps one counter, each view reports the highest index of what
  it depends on, and blocking queries (``?index=&wait=``) wait for it to pass ``index``;
- ACLs (optional): tokens with Consul-like rules, 403 "ACL not found" / "Permission denied: ...";
  lists are filtered instead, as in Consul;
- config entries (proxy-defaults, mesh, service-defaults, service-resolver, exported-services)
  with Consul's decoding, checks, permissions and blocking reads, and the discovery chains
  compiled from them;
- cluster peerings, the services this cluster exports to them, and the services imported
  through them (synthetic proxies at the exporter's mesh gateways, ``?peer=``);
- faults per path: fail, hang, drop, garbage; the index going backwards; the listener going away;
  and every request recorded.

Use it in async code as ``async with SimConsul() as sim: ...``; from synchronous code through
`SimConsulThread` (its own thread and loop); by hand with ``python -m meshgw.simconsul``.
State is shaped through the parts: ``sim.catalog``, ``sim.servers``, ``sim.gateways``,
``sim.services``, ``sim.agent``, ``sim.federation``, ``sim.ca``, ``sim.config``,
``sim.peerings``; what goes wrong through ``sim.faults`` and ``sim.raft``; what was asked
through ``sim.requests``.
"""

from meshgw.simconsul.acl import ANONYMOUS_ACCESSOR_ID, Access, AclToken
from meshgw.simconsul.faults import FaultKind, RecordedRequest
from meshgw.simconsul.golang import format_go_duration, parse_go_duration
from meshgw.simconsul.registration import decode_registration
from meshgw.simconsul.server import SimConsul
from meshgw.simconsul.shapes import (
    GATEWAY_BODY,
    check_json,
    check_service_node,
    mesh_gateway_node,
    node_json,
    service_json,
)
from meshgw.simconsul.thread import SimConsulThread

__all__ = [
    "ANONYMOUS_ACCESSOR_ID",
    "GATEWAY_BODY",
    "Access",
    "AclToken",
    "FaultKind",
    "RecordedRequest",
    "SimConsul",
    "SimConsulThread",
    "check_json",
    "check_service_node",
    "decode_registration",
    "format_go_duration",
    "mesh_gateway_node",
    "node_json",
    "parse_go_duration",
    "service_json",
]
