"""What both of the demo's stories share: printing, exit statuses, and watching the gateways
while the demo waits for Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import click

from meshgw.demo.gateways import GatewayChild

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def say(text: str = "") -> None:
    # A reader that went away (`| head`) must not stop the demo before it cleans up.
    with contextlib.suppress(BrokenPipeError):
        click.echo(text)


async def watch(children: Sequence[GatewayChild], interrupted: asyncio.Event) -> None:
    """Until interrupted; a gateway that dies meanwhile is reported, once."""
    reported: set[str] = set()
    while not interrupted.is_set():
        waits = [
            asyncio.create_task(child.proc.wait())
            for child in children
            if child.proc is not None and child.name not in reported
        ]
        stop = asyncio.create_task(interrupted.wait())
        try:
            await asyncio.wait({stop, *waits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, *waits):
                task.cancel()
        for child in children:
            if child.name not in reported and not child.running and not child.stopped_on_purpose:
                reported.add(child.name)
                say(f"warning: gateway {child.name} (pid {child.pid}) exited: see {child.spec.log}")
