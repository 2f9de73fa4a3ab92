"""Which build of meshgw is running: the connection set-up path compiled with mypyc, or pure Python.

A wheel built where mypy and a C compiler are at hand compiles `COMPILED_MODULES` (setup.py reads
the list from here); anywhere else, and in every editable install, the same typed source runs as
plain Python. Nothing else in meshgw depends on which: this module only reports it (`meshgw
--version`, `meshgw bench`). Deliberately free of meshgw imports, so setup.py can load it alone.
"""

from __future__ import annotations

import importlib.util
from importlib.machinery import EXTENSION_SUFFIXES
from typing import Final

# The code every connection runs: the hello reader and the host-name check it calls, the route
# lookup, and the data plane from accept through the tunnel's close. Not splice.py: its pipe pool
# is called once per bulk burst, next to splice(2) calls that cost far more. See docs/build.md.
COMPILED_MODULES: Final = (
    "meshgw.wire.clienthello",
    "meshgw.wire.names",
    "meshgw.routing",
    "meshgw.dataplane.context",
    "meshgw.dataplane.listener",
    "meshgw.dataplane.opening",
    "meshgw.dataplane.poller",
    "meshgw.dataplane.pump",
    "meshgw.dataplane.tunnel",
)

COMPILED: Final = "compiled (mypyc)"
PURE: Final = "pure Python"


def compiled_modules() -> list[str]:
    """Those of `COMPILED_MODULES` that load from an extension module here (found, not run)."""
    return [name for name in COMPILED_MODULES if _is_extension(name)]


def _is_extension(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec is not None else None
    return origin is not None and origin.endswith(tuple(EXTENSION_SUFFIXES))


def build() -> str:
    """`compiled (mypyc)` or `pure Python`; a mix (never built on purpose) is named as one."""
    compiled = compiled_modules()
    if not compiled:
        return PURE
    if len(compiled) == len(COMPILED_MODULES):
        return COMPILED
    return f"mixed: {', '.join(compiled)} compiled (mypyc), the rest pure Python"
