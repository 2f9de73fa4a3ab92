"""`meshgw doctor`: the WAN-federation-via-mesh-gateways bootstrap checklist, automated.

It asks a live setup, through the Consul HTTP API and the gateways' listeners, what the list of
common mistakes in docs/consul.md#common-mistakes warns about:

1. ``agent``: the agent answers /v1/agent/self (datacenter, primary, domain);
2. ``gateways``: every datacenter has a healthy mesh gateway with Meta consul-wan-federation=1,
   and no datacenter mixes gateways with and without it (list item 1 and 9);
3. ``wan-address``: every wanfed gateway has a ``wan`` tagged address (item 2);
4. ``federation-state``: a federation state exists for every datacenter;
5. ``forwarding``: ``?dc=X`` requests reach every remote datacenter (docs/consul.md#verification);
6. ``names``: datacenter and server node names have no dots (item 10, wanfed.SplitNodeName);
7. ``tls``: ``server.<dc>.<domain>`` (and each known ``<node>.server.<dc>.<domain>``) of every
   remote datacenter answers a TLS handshake through a local gateway, with a certificate valid
   for that name, offering ALPN ``consul/rpc-multi`` as a server does (item 5);
8. ``peering``: each peering's state, and whether every local mesh gateway forwards the names
   peering traffic carries through it (docs/consul.md#peering): the peering server names with
   ``PeerThroughMeshGateways``, imported and exported services; HTTP, HTTP/2 and gRPC exports,
   which meshgw refuses (peered_l7), are warnings.

A warning (``WARN``) says that something works but makes a share of its traffic fail; it does not
fail the run.

Layout: the checks are pure functions from Consul's JSON documents to `Check` values (a failed
request is passed in as its exception, a value like any other); `gather` is the thin async part
that fetches the documents and probes the gateways; `doctor_command` prints the result.
The modules: `checks` (checks 1-6 and the `Check` values), `tls` (check 7, the TLS probe),
`peering` (check 8) and `passage` (its probe: does a gateway forward a name), `runner`
(`gather` and the text and JSON output), `cli` (the click command).
"""

from meshgw.doctor.cli import doctor_command

__all__ = ["doctor_command"]
