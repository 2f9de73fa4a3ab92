"""Check 0, `settings`: the gateway's own settings, when the doctor is given them.

`meshgw doctor --config FILE` (or a MESHGW_* environment, as inside the gateway's container) loads
the settings exactly as `meshgw run` would, and says what they leave unroutable: a setting that
does not load (the gateway would not start), each of `Settings.warnings()` (settings that load but
route nothing), a gateway without Consul whose settings name no route at all, and, from what the
agent says, a gateway that would register without the wanfed meta in a datacenter whose servers
federate through mesh gateways. Without settings the check is left out: what Consul knows of the
registered gateways is checks 2 and 3.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from meshgw.doctor.checks import SETTINGS, Check, failed, passed
from meshgw.settings import ENV_INTERNAL_PREFIX, ENV_PREFIX, Settings, SettingsError

__all__ = ["GatewaySettings", "check_settings", "load_gateway_settings"]

GatewaySettings = tuple[Settings | SettingsError, str]  # the settings or why not, and their source

ROUTES_HINT = "meshgw routes --config FILE prints the routes settings give"


def load_gateway_settings(config: str | None, environ: Mapping[str, str]) -> GatewaySettings | None:
    """The gateway's settings from `--config` and the MESHGW_* environment, as `meshgw run`
    loads them; None when neither is given. A file that does not exist is the caller's usage
    error; anything wrong inside is a finding, returned as the SettingsError."""
    own = [v for v in environ if v.startswith(ENV_PREFIX) and not v.startswith(ENV_INTERNAL_PREFIX)]
    if config is None and not own:
        return None
    source = " and ".join(
        part for part in (f"--config {config}" if config else "", "MESHGW_*" if own else "") if part
    )
    try:
        return Settings.load(config=Path(config) if config else None, environ=environ), source
    except SettingsError as error:
        return error, source


def routes_nothing(settings: Settings) -> bool:
    """No Consul to learn routes from, and no route in the settings themselves."""
    from meshgw.routing import RouteTable
    from meshgw.topology import merge

    if settings.consul is not None:
        return False
    try:
        topology = merge(
            [settings.static_topology()],
            datacenter=settings.dc,
            domain=settings.domain,
            expose_servers=settings.expose_servers,
        )
    except ValueError:
        return False  # `meshgw run` refuses these settings at start, with its own message
    return not RouteTable.build(topology).to_json()["routes"]


def check_settings(loaded: GatewaySettings, *, wanfed_datacenter: bool | None) -> list[Check]:
    """`wanfed_datacenter`: whether the local datacenter federates through mesh gateways
    (a server agent with the switch on, or a local gateway with the wanfed meta); None when
    the agent could not tell."""
    settings, source = loaded
    if isinstance(settings, SettingsError):
        return [
            failed(
                SETTINGS,
                source,
                f"the gateway would not start: {settings}",
                "Correct the setting the message names; `meshgw run` refuses to start until then.",
            )
        ]
    fix = f"Change the settings so that the gateway routes what it is there for ({ROUTES_HINT})."
    results = [failed(SETTINGS, source, warning, fix) for warning in settings.warnings()]
    if routes_nothing(settings):
        results.append(
            failed(
                SETTINGS,
                source,
                "these settings route nothing: no Consul to learn routes from (--consul or "
                "CONSUL_HTTP_ADDR), and no --server or --gateway with --expose-servers, no "
                "--service with --trust-domain",
                fix,
            )
        )
    if settings.register and not settings.expose_servers and wanfed_datacenter:
        results.append(
            failed(
                SETTINGS,
                source,
                "the gateway registers without --expose-servers, so without the wanfed meta, in "
                "a datacenter whose servers federate through mesh gateways: their gateway "
                "locator ignores it, and other datacenters' gateways that pick it lose server "
                "traffic",
                "Add --expose-servers to every gateway of this datacenter.",
            )
        )
    if not results:
        where = f"Consul at {settings.consul}" if settings.consul else "the settings alone"
        results.append(passed(SETTINGS, source, f"the settings load; routes come from {where}"))
    return results
