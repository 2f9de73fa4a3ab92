"""Settings: layers (defaults < TOML < MESHGW_* < flags) and errors that name the setting."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshgw.addresses import Address
from meshgw.settings import DEFAULT_CONNECT_TIMEOUT, Settings, SettingsError, specs
from tests.conftest import REPO, WAIT


def test_defaults_are_the_documented_ones() -> None:
    s = Settings.load({"dc": "dc1"})
    assert s.listen == Address("0.0.0.0", 8443)
    assert s.admin == Address("127.0.0.1", 19100)  # loopback unless told otherwise
    assert (s.hello_timeout, s.idle_timeout, s.drain_delay, s.drain_timeout) == (10, None, 5, 30)
    # None: Consul's connect_timeout_ms where the gateway's Proxy.Config has it, else 5 s.
    assert s.connect_timeout is None and DEFAULT_CONNECT_TIMEOUT == 5
    assert s.max_hello_bytes == 65536
    assert s.max_connections is None  # auto: sized from the open-file limit at start
    assert s.expose_servers is False
    assert s.domain == "consul"


def test_layers_flags_beat_env_beat_file(tmp_path) -> None:
    config = tmp_path / "meshgw.toml"
    config.write_text(
        'dc = "dc1"\nlisten = "127.0.0.1:9000"\nhello-timeout = "2s"\n'
        'server = ["a=10.0.0.1:8300"]\n[gateway]\ndc2 = ["10.2.0.1:443", "10.2.0.2:443"]\n'
    )
    env = {"MESHGW_LISTEN": "127.0.0.1:9001", "MESHGW_EXPOSE_SERVERS": "true"}
    s = Settings.load({"listen": "127.0.0.1:9002"}, config=config, environ=env)
    assert s.listen == Address("127.0.0.1", 9002)
    assert s.expose_servers is True
    assert s.hello_timeout == 2
    assert s.server == {"a": Address("10.0.0.1", 8300)}
    assert s.gateway == {"dc2": [Address("10.2.0.1", 443), Address("10.2.0.2", 443)]}
    s = Settings.load({}, config=config, environ=env)
    assert s.listen == Address("127.0.0.1", 9001)
    s = Settings.load({"gateway": ["dc3=[::1]:8443"]}, config=config)
    assert s.gateway == {"dc3": [Address("::1", 8443)]}
    # The file can come from the environment too.
    assert Settings.load({}, environ={"MESHGW_CONFIG": str(config)}).dc == "dc1"


@pytest.mark.parametrize("spec", specs(), ids=lambda spec: spec.name)
def test_every_setting_has_one_name(spec, tmp_path) -> None:
    """The flag, the TOML key and the MESHGW_ variable of every setting agree."""
    name = spec.name
    flag = "--" + name.replace("_", "-")
    assert f"{flag} " in run_help() or f"{flag}/" in run_help()
    value = SAMPLES.get(name)
    if value is None:
        pytest.skip(f"no sample value for {name}")
    base = BASES.get(name, {"dc": "dc1"})
    from_flag = Settings.load({**base, name: value})
    env_value = ",".join(value) if isinstance(value, list) else value
    from_env = Settings.load(base, environ={f"MESHGW_{name.upper()}": env_value})
    config = tmp_path / "meshgw.toml"
    config.write_text(f"{name} = {toml_value(value)}\n")
    from_file = Settings.load(base, config=config)
    assert getattr(from_flag, name) == getattr(from_env, name) == getattr(from_file, name)
    assert getattr(from_flag, name) != getattr(Settings.load(base), name)


TD = "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"
BASES = {
    "dc": {"consul": "http://127.0.0.1:8500"},
    "primary_gateway": {"dc": "dc1", "primary_dc": "dc0"},
    "peering_server": {"dc": "dc1", "trust_domain": TD},
    "peer_export": {"dc": "dc1", "trust_domain": TD},
    "proxy_protocol": {"dc": "dc1", "proxy_protocol_from": "10.0.0.0/8"},
}
SAMPLES: dict[str, str | list[str]] = {
    "dc": "dc9",
    "domain": "example",
    "trust_domain": "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul",
    "primary_dc": "dc0",
    "listen": "127.0.0.1:9443",
    "expose_servers": "true",
    "server": ["n1=10.0.0.1:8300"],
    "gateway": ["dc2=10.2.0.1:443"],
    "service": ["web=10.0.1.1:20000"],
    "peering_server": ["10.0.0.1:8503"],
    "peer_server": [f"cluster-09/server.dc9.peering.{TD}=192.0.2.9:443"],
    "peer_export": ["web=cluster-02"],
    "peer_import": [f"pay.default.default.cluster-01.external.{TD}=192.0.2.7:443"],
    "service_watch_limit": "64",
    "proxy_protocol": "accept",
    "proxy_protocol_from": ["10.0.0.0/8"],
    "hello_timeout": "3s",
    "connect_timeout": "2s",
    "idle_timeout": "1h",
    "drain_delay": "1s",
    "drain_timeout": "10s",
    "max_hello_bytes": "16384",
    "max_connections": "100",
    "pump": "userspace",
    "workers": "2",
    "admin": "127.0.0.1:19101",
    "admin_allowed_host": ["gw.example.com"],
    "access_log": "false",
    "log_format": "json",
    "log_level": "debug",
    "consul": "http://127.0.0.1:8501",
    "token_file": "/run/token",
    "ca_file": "/etc/consul/ca.pem",
    "register": "true",
    "service_name": "gw-east",
    "proxy_id": "gw-1",
    "address": "10.0.0.5:8443",
    "wan_address": "203.0.113.5:443",
    "deregister_after_critical": "1h",
    "primary_gateway": ["10.9.0.1:443"],
    "primary_gateways_interval": "10s",
}


def toml_value(value: str | list[str]) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return f'"{value}"'


_HELP: list[str] = []


def run_help() -> str:
    if not _HELP:
        _HELP.append(run_cli("run", "--help").stdout)
    return _HELP[0]


def test_every_setting_has_a_sample() -> None:
    assert {spec.name for spec in specs()} == set(SAMPLES)


def test_max_connections_and_workers_are_numbers_or_auto(tmp_path) -> None:
    assert Settings.load({"dc": "dc1", "max_connections": "auto"}).max_connections is None
    assert Settings.load({"dc": "dc1", "workers": "auto"}).workers is None
    env = {"MESHGW_DC": "dc1", "MESHGW_MAX_CONNECTIONS": "500"}
    assert Settings.load({}, environ=env).max_connections == 500
    config = tmp_path / "meshgw.toml"
    config.write_text('dc = "dc1"\nmax_connections = 20000\n')
    assert Settings.load({}, config=config).max_connections == 20000


def test_env_lists_are_comma_separated() -> None:
    env = {"MESHGW_DC": "dc2", "MESHGW_SERVER": "a=10.0.0.1:8300, b=10.0.0.2:8300"}
    s = Settings.load({}, environ=env)
    assert s.dc == "dc2" and set(s.server) == {"a", "b"}


def test_consul_http_addr_alone_turns_discovery_on() -> None:
    s = Settings.load({}, environ={"CONSUL_HTTP_ADDR": "http://127.0.0.1:8500"})
    assert s.consul == "http://127.0.0.1:8500" and s.dc is None
    # A setting given explicitly wins over the variable.
    s = Settings.load({"consul": "http://10.0.0.1:8500"}, environ={"CONSUL_HTTP_ADDR": "x:1"})
    assert s.consul == "http://10.0.0.1:8500"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"dc": "dc.one"}, "--dc: 'dc.one' is not a Consul datacenter name"),
        ({"dc": "DC1"}, "--dc: 'DC1' is not a Consul datacenter name: lower-case"),
        ({"server": ["node.1=10.0.0.1:8300"]}, "--server: 'node.1' is not a Consul node name"),
        ({"server": ["n1=10.0.0.1"]}, "has no port"),
        ({"server": ["n1"]}, "is not NAME=HOST:PORT"),
        ({"service": ["web"]}, "--service: 'web' is not NAME=HOST:PORT"),
        ({"listen": "1.2.3.4:99999"}, "out of range"),
        ({"listen": "not an address"}, "--listen"),
        ({"hello_timeout": "ten"}, "--hello-timeout: 'ten' is not a duration"),
        ({"connect_timeout": "0"}, "--connect-timeout: '0' is out of range: give more than 0"),
        ({"max_connections": "0"}, "--max-connections: 0 is out of range 1-16777216"),
        ({"workers": "0"}, "--workers: 0 is out of range 1-1024"),
        ({"max_hello_bytes": "512"}, "--max-hello-bytes: 512 is out of range 2048-1048576"),
        ({"trust_domain": "example.consul"}, "is not a Consul trust domain"),
        ({"deregister_after_critical": "30s"}, "give from 1m to"),
        ({"pump": "magic"}, "--pump: 'magic' is not one of auto, splice, userspace, sockmap"),
        ({"gateway": ["dc1=10.0.0.1:8443"]}, "dc1 is the local datacenter"),
        ({"hello_timout": "3s"}, "unknown setting 'hello_timout'; did you mean 'hello_timeout'?"),
        (
            {"peer_server": ["Bad.Peer/server.dc9.peering.x=10.0.0.1:443"]},
            "--peer-server: 'bad.peer' is not a peering name (one DNS label)",
        ),
        (
            {"peer_import": ["server.dc9.peering.x=10.0.0.1:443"]},
            "--peer-import: 'server.dc9.peering.x' is not a peered service name",
        ),
    ],
)
def test_errors_name_the_setting_and_the_fix(flags, message) -> None:
    flags = {"dc": "dc1", **flags}
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.load(flags)


def test_file_and_environment_errors_name_the_closest_setting(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("dc = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        Settings.load({}, config=bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('dc = "dc1"\nservers = ["a=10.0.0.1:8300"]\n')
    with pytest.raises(SettingsError, match="'servers' is not a setting; did you mean key server"):
        Settings.load({}, config=unknown)
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.load({}, config=tmp_path / "missing.toml")
    with pytest.raises(SettingsError, match="MESHGW_HELLO_TIMEOUT"):
        Settings.load({"dc": "dc1"}, environ={"MESHGW_HELLO_TIMEOUT": "-"})
    wrong = re.escape("MESHGW_SERVERS is not a setting; did you mean MESHGW_SERVER?")
    with pytest.raises(SettingsError, match=wrong):
        Settings.load({"dc": "dc1"}, environ={"MESHGW_SERVERS": "a=10.0.0.1:8300"})
    # meshgw's own plumbing variables are not settings.
    assert Settings.load({"dc": "dc1"}, environ={"MESHGW_X_WORKER_FD": "7"}).dc == "dc1"


def test_restart_is_named_only_for_settings_that_differ() -> None:
    old = Settings.load({"dc": "dc1", "hello_timeout": "10s"})
    assert old.needing_restart(Settings.load({"dc": "dc1", "hello_timeout": "10"})) == []
    new = Settings.load({"dc": "dc1", "hello_timeout": "3s", "server": ["a=10.0.0.1:8300"]})
    assert old.needing_restart(new) == ["hello_timeout"]  # servers apply on reload


def test_settings_that_route_nothing_are_named() -> None:
    s = Settings.load({"dc": "dc1", "server": ["a=10.0.0.1:8300"], "service": ["w=10.0.0.2:1"]})
    warnings = s.warnings()
    assert any("--expose-servers is off" in w for w in warnings)
    assert any("without --trust-domain" in w for w in warnings)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshgw", *args],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dc", "dc_1.x"], "--dc"),
        (["--dc", "dc1", "--server", "a.b=10.0.0.1:8300"], "node name"),
        (["--dc", "dc1", "--gateway", "dc2=nowhere"], "has no port"),
        ([], "--dc is required"),
    ],
)
def test_cli_bad_settings_exit_2_with_one_line(args, needle) -> None:
    result = run_cli("run", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_port_in_use_exits_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "run", "--dc", "dc1", "--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0"
        )
    assert result.returncode == 2
    assert f"--listen 127.0.0.1:{port}: address already in use" in result.stderr
    assert f"ss -ltnp 'sport = :{port}'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_admin_address_not_on_this_host_exits_2() -> None:
    result = run_cli(
        "run", "--dc", "dc1", "--listen", "127.0.0.1:0", "--admin", "192.0.2.1:19100",
        "--workers", "1",
    )  # fmt: skip
    assert result.returncode == 2
    assert "--admin 192.0.2.1:19100: no interface of this host has address" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0,
    reason="needs setpriv, and root to give up CAP_NET_BIND_SERVICE",
)
def test_cli_low_port_without_privilege_says_the_fix() -> None:
    if _unprivileged_ports_from() <= 443:
        pytest.skip("this host lets anyone bind port 443")
    result = subprocess.run(
        ["setpriv", "--bounding-set=-net_bind_service", sys.executable, "-m", "meshgw", "run",
         "--dc", "dc1", "--listen", "127.0.0.1:443", "--admin", "127.0.0.1:0", "--workers", "1"],
        capture_output=True, text=True, timeout=WAIT * 2, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--listen 127.0.0.1:443: permission denied" in result.stderr
    assert "CAP_NET_BIND_SERVICE" in result.stderr and "8443" in result.stderr


def _unprivileged_ports_from() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def test_cli_routes_explains_names() -> None:
    args = ["routes", "--dc", "dc1", "--expose-servers", "--server", "s1=10.0.0.1:8300",
            "--gateway", "dc2=10.2.0.1:443"]  # fmt: skip
    result = run_cli(*args, "--sni", "s1.server.dc1.consul", "--sni", "X.Server.DC2.consul.")
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert "local_server" in first and "10.0.0.1:8300" in first
    assert "x.server.dc2.consul: remote_server" in second and "*.server.dc2.consul" in second
    refused = run_cli(*args, "--sni", "s2.server.dc1.consul")
    assert refused.returncode == 1
    assert "no local server named 's2'" in refused.stdout
    table = run_cli(*args)
    assert "*.server.dc2.consul" in table.stdout


def test_partition_gateways_route_internal_v1_names() -> None:
    from meshgw.routing import RouteTable
    from meshgw.topology import merge

    td = "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"
    s = Settings.load(
        {"dc": "dc1", "trust_domain": td, "gateway": ["dc2/ap1=10.2.1.1:443", "dc2=10.2.0.1:443"]}
    )
    table = RouteTable.build(merge([s.static_topology()], datacenter="dc1"))
    route = table.resolve(f"web.default.ap1.dc2.internal-v1.{td}")
    assert route is not None and [str(t.endpoint) for t in route.cluster.targets] == [
        "10.2.1.1:443"
    ]
    assert table.resolve(f"web.default.ap2.dc2.internal-v1.{td}") is None
    with pytest.raises(SettingsError, match="not a partition name"):
        Settings.load({"dc": "dc1", "gateway": ["dc2/a.b=10.0.0.1:443"]})
