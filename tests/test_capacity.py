"""Tables sized for a past peak of connections give their space back (dataplane/capacity.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import OrderedDict

import pytest

from meshgw.bench.hellos import python_hello
from meshgw.dataplane import capacity
from tests.conftest import REPO, connect, echo, eventually, recv_exactly


class Key:
    """Hashable by identity, as the data plane's connections are."""


def test_a_set_that_held_a_peak_is_rebuilt_for_what_is_left() -> None:
    peak = [Key() for _ in range(20_000)]
    table = set(peak)
    grown = sys.getsizeof(table)
    left = peak[:100]
    table.difference_update(peak[100:])
    assert sys.getsizeof(table) == grown  # a set never shrinks by itself
    same = table
    assert capacity.compact(table)
    assert table is same and table == set(left)
    assert sys.getsizeof(table) <= sys.getsizeof(set(left))
    assert sys.getsizeof(table) * 50 < grown
    assert not capacity.compact(table)  # rebuilt for what it holds: nothing more to give


@pytest.mark.parametrize("kind", [dict, OrderedDict])
def test_a_dict_is_rebuilt_in_place_in_order(kind: type[dict[int, str]]) -> None:
    table = kind((fd, f"handler {fd}") for fd in range(20_000))
    grown = sys.getsizeof(table)
    for fd in range(20_000):
        if fd % 400:
            del table[fd]
    left = list(table.items())
    assert capacity.compact(table)
    assert list(table.items()) == left  # same entries, same order (deadline order for these)
    assert sys.getsizeof(table) * 50 < grown


def test_tables_that_are_small_or_full_are_left_alone() -> None:
    full = {Key() for _ in range(20_000)}
    assert sys.getsizeof(full) >= capacity.COMPACT_FROM_BYTES
    assert not capacity.compact(full)
    members = [Key() for _ in range(2_000)]
    small = set(members)
    small.difference_update(members[1:])
    assert sys.getsizeof(small) < capacity.COMPACT_FROM_BYTES  # in the heap: not worth it
    assert not capacity.compact(small)
    assert capacity.compact(small, floor=0)


def test_the_gateway_gives_back_its_tables_after_a_drop(
    gateway_factory, backend_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peak of open connections, and of hellos in progress, then most of them close: the
    listener's connection set, the poller's handler table and the hello deadlines shrink to
    what is left, and the connections left still carry bytes both ways."""
    # A few hundred connections stand in for the thousands that make real tables worth it.
    monkeypatch.setattr(capacity, "COMPACT_FROM_BYTES", 2048)

    server = backend_factory(echo)
    gw = gateway_factory(expose_servers=True, server=[f"n={server.address}"])
    hello = python_hello("n.server.dc1.consul")
    listener = gw.gateway.listener
    assert listener is not None
    routed = [connect(gw.port) for _ in range(120)]
    for client in routed:
        client.sendall(hello)
    for client in routed:
        assert recv_exactly(client, len(hello)) == hello  # through to the echo and back
    stalled = [connect(gw.port) for _ in range(120)]
    for client in stalled:
        client.sendall(hello[:50])  # in the hello phase until its deadline (10 s)

    def sizes() -> tuple[int, int, int, int]:
        return gw.call(
            lambda: (
                len(listener.dp.connections),
                sys.getsizeof(listener.dp.connections),
                sys.getsizeof(listener.dp.poller.handlers),
                sys.getsizeof(listener.dp.hello_deadlines._waiting),
            )
        )

    eventually(lambda: sizes()[0] == 240)
    _, set_peak, handlers_peak, hellos_peak = sizes()
    kept, closing = routed[:5], routed[5:] + stalled
    try:
        for client in closing:
            client.close()
        eventually(lambda: sizes()[0] == 5, what="connections did not close")
        _, set_now, _, hellos_now = eventually(
            lambda: (s := sizes())[1] < set_peak / 4 and s[2] < handlers_peak / 4 and s,
            what=f"tables not rebuilt: {sizes()}",
        )
        assert hellos_now < hellos_peak / 4
        assert set_now <= sys.getsizeof({Key() for _ in range(5)})
        for i, client in enumerate(kept):
            message = b"after the rebuild %d" % i
            client.sendall(message)
            assert recv_exactly(client, len(message)) == message
    finally:
        for client in kept:
            client.close()


@pytest.mark.slow
def test_the_memory_measurement_runs_and_finds_no_connection_left() -> None:
    """tests/memory_after_drop.py, which docs/operations.md#memory quotes, on a small scale."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.memory_after_drop", "--connections", "300", "--trim"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    stages = re.findall(r"^(\S+(?: \S+)*?) +RSS +([\d.]+) MiB", done.stdout, re.M)
    names = [name for name, _ in stages]
    assert "round-2: 300 open" in names and "after malloc_trim(0)" in names, done.stdout
    grown = re.findall(r"object types grown since the baseline: (.*)", done.stdout)
    assert len(grown) == 2, done.stdout
    for line in grown:  # nothing of a closed connection outlives it
        assert not re.search(r"'(Opening|Dialer|Tunnel|Flow|socket|Hello|method)'", line), line
