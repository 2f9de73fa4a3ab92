"""`meshgw demo`'s story, told in order: start, dial everything, show it, (fail over, dial again).

Interactive: after the first round it prints commands to try and runs until SIGINT/SIGTERM.
`--check`: after the first round it stops one gateway per datacenter (SIGTERM: they drain), makes
every server dial through the survivors, and exits 0 only if every path worked both times.
Either way every gateway process is stopped by its PID and waited for before the demo exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from meshgw.demo import report
from meshgw.demo.federation import Federation, Shape
from meshgw.demo.gateways import Counters, GatewayStartError
from meshgw.demo.layout import check_dir
from meshgw.demo.servers import PathResult
from meshgw.tls.certs import CertError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


@dataclass(frozen=True, slots=True)
class DemoOptions:
    shape: Shape
    directory: Path | None = None
    check: bool = False


def say(text: str = "") -> None:
    # A reader that went away (`| head`) must not stop the demo before it cleans up.
    with contextlib.suppress(BrokenPipeError):
        click.echo(text)


def run(options: DemoOptions) -> int:
    import uvloop

    return uvloop.run(_main(options))


async def _main(options: DemoOptions) -> int:
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupted.set)
    if options.directory is not None:
        try:
            check_dir(options.directory)
        except ValueError as error:
            say(f"meshgw demo: error: {error}")
            return EXIT_FAILED
        root, temporary = options.directory.resolve(), False
        root.mkdir(parents=True, exist_ok=True)
    else:
        root, temporary = Path(tempfile.mkdtemp(prefix="meshgw-demo-")), True
    federation = Federation(options.shape, root)
    story = asyncio.create_task(_story(federation, options, interrupted))
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
    except (GatewayStartError, CertError, OSError) as error:
        say(f"meshgw demo: error: {error}")
        if isinstance(error, GatewayStartError) and error.output:
            say("  last lines of its log:\n    " + "\n    ".join(error.output[-5:]))
        status = EXIT_FAILED
    finally:
        waiter.cancel()
        codes = await federation.stop_gateways(federation.children)
        for server in federation.servers:
            await server.close()
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
    say(f"  gateways: {len(federation.children)} `meshgw run` processes, all listening")

    say("\nRound 1: every server dials every server of the other datacenters via a local gateway")
    first = await federation.round()
    counters = await federation.counters()
    _show_round(federation, first, counters, every_path=True)

    if not options.check:
        _show_hints(federation)
        await _watch(federation, interrupted)
        return EXIT_OK

    # Failover: the first gateway of each datacenter goes away. Local servers stop dialing it
    # (it deregisters); the other datacenters' gateways still list it and must fail over.
    stopping = [federation.gateways[dc][0] for dc in federation.datacenters]
    say(f"\nFailover: stopping {', '.join(c.name for c in stopping)} (SIGTERM, drain)")
    for child in stopping:
        federation.retire(child)
    codes = await federation.stop_gateways(stopping)
    exits = zip(stopping, codes, strict=True)
    say("  " + ", ".join(f"{c.name} (pid {c.pid}) exited {code}" for c, code in exits))

    say("\nRound 2: every path again, through the surviving gateways")
    second = await federation.round()
    later = await federation.counters()
    for child in stopping:
        later[child.name] = counters.get(child.name)  # its last reading, before it stopped
    _show_round(federation, second, later, every_path=False)

    stopped_names = {c.name for c in stopping}
    misrouted = [
        r
        for r in second
        if r.local_gateway in stopped_names or stopped_names.intersection(r.remote_gateways)
    ]
    failures = report.failed_paths(first) + report.failed_paths(second)
    failures += [f"{r.source} -> {r.target} went through a stopped gateway" for r in misrouted]
    failovers = _failovers(later, stopped_names)
    elapsed = time.monotonic() - began
    if failures:
        say(f"\ncheck FAILED after {elapsed:.1f} s: {len(failures)} failed paths")
        for line in failures:
            say("  " + line)
        return EXIT_FAILED
    say(
        f"\ncheck passed in {elapsed:.1f} s: {len(first)}/{len(first)} paths before and "
        f"{len(second)}/{len(second)} after stopping one gateway per datacenter; the dialing "
        f"gateways failed over from stopped remote gateways {failovers} times"
    )
    return EXIT_OK


def _failovers(counters: dict[str, Counters | None], stopped: set[str]) -> int:
    return sum(c.failovers for name, c in counters.items() if c is not None and name not in stopped)


def _show_round(
    federation: Federation,
    results: list[PathResult],
    counters: dict[str, Counters | None],
    every_path: bool,
) -> None:
    ok = sum(r.ok for r in results)
    say(f"  {ok}/{len(results)} paths worked (gossip packet ping/ack, rpc, push/pull each)\n")
    if every_path:
        say(report.paths_table(results))
    else:
        say(report.routes_summary(results))
        for line in report.failed_paths(results):
            say("  failed: " + line)
    say("\nWAN members (as `consul members -wan` lists them; alive = reached from every other DC)")
    say(report.members_table(federation.servers, results))
    say("\nGateways (counters from each gateway's /metrics)")
    say(report.gateways_table(federation.children, counters))


def _show_hints(federation: Federation) -> None:
    assert federation.pki is not None
    first_dc, second_dc = federation.datacenters[0], federation.datacenters[1]
    gateway = federation.gateways[first_dc][0]
    client = federation.pki.servers[(first_dc, "node-0")]
    say("\nTry it by hand (the demo keeps running; Ctrl-C stops every gateway and exits):")
    say(
        report.try_by_hand(
            federation.pki.ca,
            client,
            gateway,
            target_sni=f"node-0.server.{second_dc}.consul",
            local_sni=f"node-0.server.{first_dc}.consul",
        )
    )


async def _watch(federation: Federation, interrupted: asyncio.Event) -> None:
    """Until interrupted; a gateway that dies meanwhile is reported, once."""
    reported: set[str] = set()
    while not interrupted.is_set():
        waits = [
            asyncio.create_task(child.proc.wait())
            for child in federation.children
            if child.proc is not None and child.name not in reported
        ]
        stop = asyncio.create_task(interrupted.wait())
        try:
            await asyncio.wait({stop, *waits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, *waits):
                task.cancel()
        for child in federation.children:
            if child.name not in reported and not child.running and not child.stopped_on_purpose:
                reported.add(child.name)
                say(f"warning: gateway {child.name} (pid {child.pid}) exited: see {child.spec.log}")
