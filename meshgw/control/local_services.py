"""The local mesh services this gateway routes to, with their service-resolver subsets.

For each service, a blocking query on `/v1/health/connect/<svc>` gives its Connect instances
(sidecars or native); for each subset of its service-resolver (all resolvers come from one query,
`/v1/config/service-resolver`), the same query with the subset's `?filter=`, so that Consul
evaluates the filter language and meshgw never has to (docs/consul.md#subsets). `OnlyPassing`
marks instances with any non-passing check unhealthy; `DefaultSubset` gives the plain name that
subset's instances; `ConnectTimeout` holds for the service's clusters.

Scale: one blocking query per service is cheap for the few hundred services most catalogs hold,
and too much for thousands (each holds an HTTP connection to the agent for minutes). Up to
`limit` services are watched at once: all of them while the catalog holds no more than that, else
only those a connection asked for (`demand`), the least recently asked-for one making room for a
new one. A name is demanded again the next time a connection needs it.
"""

from __future__ import annotations

from collections import OrderedDict

from meshgw.control import catalog
from meshgw.control.central import Resolver, Subset, service_resolvers
from meshgw.control.consul.client import Response
from meshgw.control.watching import Params, Watches
from meshgw.topology import ClusterSettings, Endpoints, ServiceKey

DEFAULT_WATCH_LIMIT = 256


class LocalServices:
    def __init__(self, watches: Watches, skipped: frozenset[str], limit: int) -> None:
        self.watches = watches
        self.skipped = skipped  # the `consul` service and this gateway's own name
        self.limit = limit
        self.names: set[str] = set()  # every service in the catalog
        self.watched: OrderedDict[str, None] = OrderedDict()  # least recently asked for first
        self.resolvers: dict[str, Resolver] = {}
        self.instances: dict[ServiceKey, Endpoints] = {}

    @property
    def on_demand(self) -> bool:
        return len(self.names) > self.limit

    def start(self) -> None:
        # Typical services only: Consul filters out sidecars, gateways and the like.
        params: Params = {"filter": 'ServiceKind == ""'}
        self.watches.follow("services", "/v1/catalog/services", self._on_list, params=params)
        self.watches.follow("service-resolvers", "/v1/config/service-resolver", self._on_resolvers)

    def _on_list(self, answer: Response) -> None:
        body = answer.body
        if not isinstance(body, dict):
            raise catalog.CatalogError("/v1/catalog/services: expected a JSON object")
        self.names = {str(name) for name in body} - self.skipped
        for name in [n for n in self.watched if n not in self.names]:
            self._unwatch(name)
        if not self.on_demand:
            for name in sorted(self.names - self.watched.keys()):
                self._watch(name)

    def demand(self, name: str) -> bool:
        """A connection asked for `name`: watch it if the catalog has it. True if it is (or
        now will be) watched."""
        if name not in self.names:
            return False
        if name in self.watched:
            self.watched.move_to_end(name)
            return True
        while len(self.watched) >= self.limit:
            self._unwatch(next(iter(self.watched)))
        self._watch(name)
        return True

    def _on_resolvers(self, answer: Response) -> None:
        resolvers = service_resolvers(answer.body)
        changed = {
            name
            for name in resolvers.keys() | self.resolvers.keys()
            if resolvers.get(name) != self.resolvers.get(name)
        }
        self.resolvers = resolvers
        for name in changed & self.watched.keys():
            self._watch(name)  # again, with the new subsets

    def _watch(self, name: str) -> None:
        self._unwatch(name)
        self.watched[name] = None
        self._follow(name, None, None)
        resolver = self.resolvers.get(name)
        for subset_name, subset in sorted((resolver.subsets if resolver else {}).items()):
            self._follow(name, subset_name, subset)

    def _follow(self, name: str, subset_name: str | None, subset: Subset | None) -> None:
        params: Params | None = None
        if subset is not None and subset.filter:
            params = {"filter": subset.filter}
        only_passing = subset is not None and subset.only_passing

        def on_instances(answer: Response) -> None:
            parsed = catalog.service_instances(
                answer.body, name, subset=subset_name, only_passing=only_passing
            )
            self._drop(name, subset_name)
            self.instances.update(parsed.endpoints)

        label = f"service {name}" + (f" subset {subset_name}" if subset_name else "")
        self.watches.follow(label, f"/v1/health/connect/{name}", on_instances, params=params)

    def _unwatch(self, name: str) -> None:
        self.watched.pop(name, None)
        for label in self.watches.names(f"service {name}"):
            if label == f"service {name}" or label.startswith(f"service {name} subset "):
                self.watches.stop(label)
        self.instances = {k: v for k, v in self.instances.items() if k.name != name}

    def _drop(self, name: str, subset: str | None) -> None:
        self.instances = {
            k: v for k, v in self.instances.items() if not (k.name == name and k.subset == subset)
        }

    def services(self) -> dict[ServiceKey, Endpoints]:
        """Every watched service and subset; a DefaultSubset's instances under the plain name."""
        found = {k: v for k, v in self.instances.items() if v}
        for key, endpoints in self.instances.items():
            resolver = self.resolvers.get(key.name)
            if key.subset is not None and resolver and resolver.default_subset == key.subset:
                found[ServiceKey(key.name, key.namespace, key.partition)] = endpoints
        return found

    def settings(self) -> dict[ServiceKey, ClusterSettings]:
        namespaces = {(k.name, k.namespace, k.partition) for k in self.instances}
        return {
            ServiceKey(name, namespace, partition): ClusterSettings(connect_timeout=timeout)
            for name, namespace, partition in namespaces
            if (timeout := _timeout(self.resolvers.get(name))) is not None
        }


def _timeout(resolver: Resolver | None) -> float | None:
    return resolver.connect_timeout if resolver is not None else None
