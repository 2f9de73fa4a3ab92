"""Federation states: the mesh gateways every datacenter's leader publishes from its catalog.

One replicated store (every datacenter eventually holds all states). The leaders' anti-entropy
follows the catalog, at once or `delay` seconds later; a state can also be written directly
(a stale replicated copy) and frozen so anti-entropy leaves it alone.
"""

from __future__ import annotations

import copy
import datetime

from meshgw.simconsul.catalog import Catalog
from meshgw.simconsul.shapes import Json


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class FederationStates:
    def __init__(self, catalog: Catalog, *, delay: float = 0.0) -> None:
        self.catalog = catalog
        self.raft = catalog.raft
        self.delay = delay
        self.states: dict[str, dict[str, Json]] = {}
        catalog.listeners.append(self.anti_entropy)

    def anti_entropy(self) -> None:
        """Bring every datacenter's state in line with its catalog (now, or after `delay`)."""
        loop = self.raft.signal.loop
        if self.delay > 0 and loop is not None and not loop.is_closed():
            delay = self.delay
            loop.call_soon_threadsafe(lambda: loop.call_later(delay, self.sync))
        else:
            self.sync()

    def sync(self) -> None:
        with self.raft.lock:
            for dc, state in self.catalog.dcs.items():
                if not state.fed_auto:
                    continue
                gateways = [
                    self.catalog.render(state, inst)
                    for inst in self.catalog.instances(state)
                    if inst.kind == "mesh-gateway" and not inst.peer
                ]
                current = self.states.get(dc)
                if current is None and not gateways:
                    continue
                if current is not None and current.get("MeshGateways", []) == gateways:
                    continue  # IsSame: ignores UpdatedAt
                self._write(dc, gateways)

    def _write(self, dc: str, gateways: list[dict[str, Json]]) -> None:
        index = self.raft.index + 1
        current = self.states.get(dc)
        state: dict[str, Json] = {"Datacenter": dc}
        if gateways:  # MeshGateways is omitempty
            state["MeshGateways"] = gateways
        state |= {
            "UpdatedAt": _now_rfc3339(),
            "PrimaryModifyIndex": index,
            "CreateIndex": current["CreateIndex"] if current else index,
            "ModifyIndex": index,
        }
        self.states[dc] = state
        self.raft.commit(("fed",))

    def set(self, dc: str, gateways: list[dict[str, Json]] | None, *, freeze: bool = True) -> None:
        """Write dc's federation state directly (e.g. a stale replicated copy); with freeze, the
        leader anti-entropy stops rewriting it from dc's catalog. None deletes the state."""
        with self.raft.lock:
            self.catalog.ensure_dc(dc).fed_auto = not freeze
            if gateways is None:
                self.states.pop(dc, None)
                self.raft.commit(("fed",))
            else:
                self._write(dc, copy.deepcopy(gateways))

    def state(self, dc: str) -> dict[str, Json] | None:
        """A copy of dc's state, for assertions."""
        with self.raft.lock:
            return copy.deepcopy(self.states.get(dc))

    def listing(self) -> list[dict[str, Json]]:
        with self.raft.lock:
            return [copy.deepcopy(self.states[dc]) for dc in sorted(self.states)]
