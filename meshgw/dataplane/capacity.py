"""Give back the hash-table space a peak of connections left in the data plane's tables.

CPython sizes a set or dict for the most entries it ever held. A set never shrinks: removals
leave slots that later additions reuse, so it never reaches the fill that makes it resize. A
dict shrinks only when an insertion finds its table full, which an idle gateway never does.
After 9,000 connections closed, the listener's connection set and the poller's handler table
still held 1.1 MiB of slots for them (measured; see docs/operations.md#memory). Each table here
is mapped memory of its own once it passes the allocator's mmap threshold (128 KiB), so
rebuilding it returns those pages to the system at once.

The listener's periodic deadline sweep calls :func:`compact` on its tables: two ``getsizeof``
calls per table and sweep when nothing is to be done, nothing on the per-connection path.
"""

from __future__ import annotations

import sys
from typing import Any, Final

# Smaller tables live inside the malloc heap, where freeing them rarely returns a page.
COMPACT_FROM_BYTES: Final = 256 * 1024
# Bytes per entry a table takes at most when built afresh (measured on CPython 3.11 for 500 to
# 70,000 entries: set 107, dict 60, OrderedDict 116). A table over OVERSIZE times that is
# mostly empty slots, and rebuilding it can never leave it oversized again.
_BYTES_PER_ENTRY: Final = 128
OVERSIZE: Final = 4


def oversized(table: set[Any] | dict[Any, Any], floor: int | None = None) -> bool:
    """Whether ``table`` takes at least ``floor`` bytes, mostly for slots it no longer uses."""
    size = sys.getsizeof(table)
    limit = COMPACT_FROM_BYTES if floor is None else floor
    return size >= limit and size > OVERSIZE * _BYTES_PER_ENTRY * len(table)


def compact(table: set[Any] | dict[Any, Any], floor: int | None = None) -> bool:
    """Rebuild an oversized ``table`` in place, for what it holds now; True if it was.

    In place, so every holder of a reference keeps a live table; a dict (an OrderedDict too)
    keeps its order. Costs one pass over the entries left, a small fraction of the peak by
    the time it runs. Not while the table is being iterated.
    """
    if not oversized(table, floor):
        return False
    if isinstance(table, dict):
        items = list(table.items())
        table.clear()  # frees the table; refilling sizes a new one for what is left
        table.update(items)
    else:
        members = list(table)
        table.clear()
        table.update(members)
    return True
