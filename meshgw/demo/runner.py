"""`meshgw demo`'s story, told in order: start, dial everything, show it, (fail over, dial again).

Interactive: after the first round it prints commands to try and runs until SIGINT/SIGTERM.
`--check`: after the first round it stops one gateway per datacenter (SIGTERM: they deregister
and drain), waits until every other gateway has learned it from the agents, makes every server
dial through the survivors, and exits 0 only if every path worked both times and none went
through a stopped gateway. `--peering` tells the peering story instead (peering_story.py).
Either way every gateway process is stopped by its PID and waited for before the demo exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from meshgw.demo import report
from meshgw.demo.console import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, say, watch
from meshgw.demo.federation import DiscoveryError, Federation, Shape
from meshgw.demo.gateways import Counters, GatewayStartError
from meshgw.demo.layout import DOMAIN, check_dir
from meshgw.demo.peering import PeeringDemo
from meshgw.demo.peering_story import peering_story
from meshgw.demo.servers import PathResult
from meshgw.tls.certs import CertError


@dataclass(frozen=True, slots=True)
class DemoOptions:
    shape: Shape
    directory: Path | None = None
    check: bool = False
    peering: bool = False


def run(options: DemoOptions) -> int:
    import uvloop

    return uvloop.run(_main(options))


def _root(options: DemoOptions) -> tuple[Path, bool] | None:
    """The demo's folder and whether it is a temporary one; None (said why) when unusable."""
    if options.directory is None:
        return Path(tempfile.mkdtemp(prefix="meshgw-demo-")), True
    try:
        check_dir(options.directory)
    except ValueError as error:
        say(f"meshgw demo: error: {error}")
        return None
    root = options.directory.resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root, False


async def _main(options: DemoOptions) -> int:
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupted.set)
    found = _root(options)
    if found is None:
        return EXIT_FAILED
    root, temporary = found
    demo: Federation | PeeringDemo
    tell: Callable[[], Awaitable[int]]
    if options.peering:
        demo = peering = PeeringDemo(options.shape, root)
        tell = lambda: peering_story(peering, options.check, interrupted)  # noqa: E731
    else:
        demo = federation = Federation(options.shape, root)
        tell = lambda: _story(federation, options, interrupted)  # noqa: E731
    story = asyncio.create_task(tell())
    waiter = asyncio.create_task(interrupted.wait())
    try:
        await asyncio.wait({story, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if story.done():
            status = story.result()
        else:
            story.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await story
            say("\ninterrupted: stopping")
            status = EXIT_INTERRUPTED if options.check else EXIT_OK
    except (GatewayStartError, DiscoveryError, CertError, OSError) as error:
        say(f"meshgw demo: error: {error}")
        if isinstance(error, GatewayStartError) and error.output:
            say("  last lines of its log:\n    " + "\n    ".join(error.output[-5:]))
        status = EXIT_FAILED
    finally:
        waiter.cancel()
        codes = await asyncio.gather(*(child.stop() for child in demo.children))
        await demo.close()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
        if codes:
            say(f"stopped {len(codes)} gateway processes")
    return status


async def _story(federation: Federation, options: DemoOptions, interrupted: asyncio.Event) -> int:
    shape = options.shape
    began = time.monotonic()
    say(
        report.banner(
            shape.datacenters, shape.servers_per_dc, shape.gateways_per_dc, federation.root
        )
    )
    await federation.start(lambda line: say("  " + line))
    say(
        f"  discovery: every gateway registered with its agent and learned its servers and the "
        f"other datacenters' gateways from it ({time.monotonic() - began:.1f} s in all)"
    )

    say("\nRound 1: every server dials every server of the other datacenters via a local gateway")
    first = await federation.round()
    counters = await federation.counters()
    _show_round(federation, first, counters)

    if not options.check:
        await _show_hints(federation)
        await watch(federation.children, interrupted)
        return EXIT_OK

    # Failover: the first gateway of each datacenter goes away. It deregisters: its own
    # datacenter's servers stop dialing it, the other datacenters' gateways stop routing to it.
    stopping = [federation.gateways[dc][0] for dc in federation.datacenters]
    say(f"\nFailover: stopping {', '.join(c.name for c in stopping)} (SIGTERM: deregister, drain)")
    codes = await federation.stop_gateways(stopping)
    exits = zip(stopping, codes, strict=True)
    say("  " + ", ".join(f"{c.name} (pid {c.pid}) exited {code}" for c, code in exits))
    await federation.wait_discovered()
    say("  every other gateway learned it from the agents' federation states and catalogs")

    say("\nRound 2: every path again, through the surviving gateways")
    second = await federation.round()
    later = await federation.counters()
    for child in stopping:
        later[child.name] = counters.get(child.name)  # its last reading, before it stopped
    _show_round(federation, second, later)

    failures = check_failures(first, second, {c.name for c in stopping})
    elapsed = time.monotonic() - began
    if failures:
        say(f"\ncheck FAILED after {elapsed:.1f} s: {len(failures)} failed paths")
        for line in failures:
            say("  " + line)
        return EXIT_FAILED
    say(
        f"\ncheck passed in {elapsed:.1f} s: {len(first)}/{len(first)} paths before and "
        f"{len(second)}/{len(second)} after stopping one gateway per datacenter, none through "
        "a stopped gateway"
    )
    return EXIT_OK


def check_failures(
    first: list[PathResult], second: list[PathResult], stopped: set[str]
) -> list[str]:
    """What makes `--check` fail: a failed path in either round, or a path of the second round
    that went through a gateway that was stopped."""
    misrouted = [
        r for r in second if r.local_gateway in stopped or stopped.intersection(r.remote_gateways)
    ]
    failures = report.failed_paths(first) + report.failed_paths(second)
    failures += [f"{r.source} -> {r.target} went through a stopped gateway" for r in misrouted]
    return failures


def _show_round(
    federation: Federation,
    results: list[PathResult],
    counters: dict[str, Counters | None],
) -> None:
    say("\nWAN members (as `consul members -wan` lists them; alive = reached from every other DC)")
    say(report.members_table(federation.servers, results))
    say("\n" + report.verdict(results) + " (gossip packet ping/ack, rpc, push/pull each)")
    say("\nPaths by datacenter pair (connections that worked, by ALPN protocol)")
    say(report.pairs_table(results))
    for line in report.failed_paths(results):
        say("  failed: " + line)
    in_consul = {
        child.name: federation.agents.check_status(child.spec.dc, child.spec.service_id)
        for child in federation.children
    }
    say(
        "\nGateways (IN CONSUL: as their agent lists them; counters from each one's /metrics; "
        "client_closed: the agents' TCP health checks connect and close)"
    )
    say(report.gateways_table(federation.children, counters, in_consul))


async def _show_hints(federation: Federation) -> None:
    assert federation.pki is not None
    first_dc, second_dc = federation.datacenters[0], federation.datacenters[1]
    gateway = federation.gateways[first_dc][0]
    hints = report.Hints(
        agent=federation.agents.url(first_dc),
        ca=federation.pki.ca,
        client_cert=federation.pki.servers[(first_dc, "node-0")],
        gateway=gateway,
        target_sni=f"node-0.server.{second_dc}.{DOMAIN}",
        local_sni=f"node-0.server.{first_dc}.{DOMAIN}",
    )
    say("\nTry it by hand (the demo keeps running; Ctrl-C stops every gateway and exits):")
    say(report.try_by_hand(hints))
