"""The composition root: the one place that knows every layer and wires them together.

Settings → topology parts (controlplane.py) → merged Topology → RouteTable → data plane;
the admin face reads the gateway's state (gateway.py).
"""

from __future__ import annotations

from meshgw.app.gateway import Gateway, StartupError, run

__all__ = ["Gateway", "StartupError", "run"]
