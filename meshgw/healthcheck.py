"""`meshgw health`: ask a running gateway's admin face whether it is healthy.

The admin address is whatever the gateway's settings say, loaded the way `meshgw run` loads them.
With `--pid N` they are those of process N: its command line (the flags after `meshgw run`) and
its environment, read from /proc, so a container's HEALTHCHECK (`meshgw health --pid 1`) follows
the address however it was set: MESHGW_ADMIN, `docker run IMAGE --admin ...`, or a --config file.
Without `--pid`, this process's own environment (MESHGW_*, MESHGW_CONFIG) is used.

Exit status 0 when the admin face answers 200, 1 otherwise; one line either way.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from meshgw.addresses import Address
from meshgw.settings import CONFIG_ENV, Settings, SettingsError, process_environment

__all__ = ["admin_url", "health_command", "run_arguments", "settings_of_process"]

EXIT_HEALTHY, EXIT_UNHEALTHY = 0, 1
# Where a wildcard bind is reached from the same network namespace.
_LOOPBACK_FOR = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class HealthError(Exception):
    """Why the check could not be made; the message names the process or setting."""


def run_arguments(argv: Sequence[str]) -> list[str] | None:
    """The arguments after `meshgw run` in a command line (`meshgw run ...`,
    `python -m meshgw run ...`, `docker-init -- meshgw run ...`); None if it is not one."""
    for index in range(1, len(argv)):
        if argv[index] == "run" and Path(argv[index - 1]).name == "meshgw":
            return list(argv[index + 1 :])
    return None


def _read_process(pid: int) -> tuple[list[str], dict[str, str], str]:
    proc = Path("/proc") / str(pid)
    try:
        argv = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        raw_env = (proc / "environ").read_bytes().split(b"\0")
        cwd = os.readlink(proc / "cwd")
    except (FileNotFoundError, ProcessLookupError):
        raise HealthError(f"there is no process {pid}") from None
    except OSError as error:
        raise HealthError(f"cannot read process {pid}: {error.strerror}") from None
    environ = {}
    for item in raw_env:
        name, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            environ[name] = value
    return argv, environ, cwd


def settings_of_process(pid: int) -> Settings:
    """The settings process `pid` (a `meshgw run`) started with."""
    from meshgw.cli import run

    argv, environ, cwd = _read_process(pid)
    args = run_arguments(argv)
    if args is None:
        raise HealthError(f"process {pid} is not `meshgw run` ({' '.join(argv[:3])} ...)")
    try:
        with run.make_context("run", args) as ctx:
            flags: dict[str, Any] = dict(ctx.params)
    except click.ClickException as error:
        message = error.format_message()
        raise HealthError(f"cannot read the flags of process {pid}: {message}") from None
    config = flags.pop("config", None) or environ.pop(CONFIG_ENV, None)
    if config is not None:  # relative to where the gateway runs, not to here
        config = os.path.join(cwd, config)
    return Settings.load(flags, config=config, environ=environ)


def admin_url(admin: Address, path: str) -> str:
    if admin.port == 0:
        raise HealthError("--admin has port 0 (chosen by the kernel): there is no port to ask")
    host = _LOOPBACK_FOR.get(admin.host, admin.host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{admin.port}{path}"


def probe(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as error:
        return False, f"{url}: {error.code} {error.read(200).decode(errors='replace').strip()}"
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return False, f"{url}: no answer ({reason})"


@click.command("health")
@click.option(
    "--pid",
    type=int,
    default=None,
    help="Take the settings of this `meshgw run` process (its flags and environment) "
    "[default: this process's environment]. In a container: --pid 1.",
)
@click.option("--ready", is_flag=True, help="Ask /ready (routes loaded) instead of /healthz.")
@click.option(
    "--timeout", type=float, default=2.0, show_default=True, help="Seconds to wait for an answer."
)
def health_command(pid: int | None, ready: bool, timeout: float) -> None:
    """Ask a running gateway's admin face for /healthz; exit 0 if it answers 200."""
    try:
        settings = (
            settings_of_process(pid)
            if pid is not None
            else Settings.load(environ=process_environment())
        )
        url = admin_url(settings.admin, "/ready" if ready else "/healthz")
    except (HealthError, SettingsError) as error:
        click.echo(f"meshgw: unhealthy: {error}", err=True)
        sys.exit(EXIT_UNHEALTHY)
    healthy, line = probe(url, timeout)
    click.echo(line, err=not healthy)
    sys.exit(EXIT_HEALTHY if healthy else EXIT_UNHEALTHY)
