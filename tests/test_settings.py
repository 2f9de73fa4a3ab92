"""Settings: layers (defaults < TOML < MESHGW_* < flags) and errors that name the setting."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from meshgw.settings import Address, Settings, SettingsError
from tests.conftest import REPO, WAIT


def test_defaults_are_the_documented_ones() -> None:
    s = Settings.load({"dc": "dc1"})
    assert s.listen == Address("0.0.0.0", 8443)
    assert s.admin == Address("127.0.0.1", 19100)  # loopback unless told otherwise
    assert (s.hello_timeout, s.connect_timeout, s.idle_timeout, s.drain_timeout) == (
        10,
        5,
        None,
        30,
    )
    assert s.max_hello_bytes == 65536
    assert s.max_connections is None  # auto: sized from the open-file limit at start
    assert s.expose_servers is False
    assert s.domain == "consul"


def test_layers_flags_beat_env_beat_file(tmp_path) -> None:
    config = tmp_path / "meshgw.toml"
    config.write_text(
        'dc = "dc1"\nlisten = "127.0.0.1:9000"\nhello-timeout = "2s"\n'
        'servers = ["a=10.0.0.1:8300"]\n[gateways]\ndc2 = ["10.2.0.1:443", "10.2.0.2:443"]\n'
    )
    env = {"MESHGW_LISTEN": "127.0.0.1:9001", "MESHGW_EXPOSE_SERVERS": "true"}
    s = Settings.load({"listen": "127.0.0.1:9002"}, config=config, environ=env)
    assert s.listen == Address("127.0.0.1", 9002)
    assert s.expose_servers is True
    assert s.hello_timeout == 2
    assert s.servers == {"a": Address("10.0.0.1", 8300)}
    assert s.gateways == {"dc2": [Address("10.2.0.1", 443), Address("10.2.0.2", 443)]}
    s = Settings.load({}, config=config, environ=env)
    assert s.listen == Address("127.0.0.1", 9001)
    s = Settings.load({"gateways": ["dc3=[::1]:8443"]}, config=config)
    assert s.gateways == {"dc3": [Address("::1", 8443)]}


def test_max_connections_is_a_number_or_auto(tmp_path) -> None:
    assert Settings.load({"dc": "dc1", "max_connections": "auto"}).max_connections is None
    env = {"MESHGW_DC": "dc1", "MESHGW_MAX_CONNECTIONS": "500"}
    assert Settings.load({}, environ=env).max_connections == 500
    config = tmp_path / "meshgw.toml"
    config.write_text('dc = "dc1"\nmax_connections = 20000\n')
    assert Settings.load({}, config=config).max_connections == 20000


def test_env_lists_are_comma_separated() -> None:
    env = {"MESHGW_DC": "dc2", "MESHGW_SERVERS": "a=10.0.0.1:8300, b=10.0.0.2:8300"}
    s = Settings.load({}, environ=env)
    assert s.dc == "dc2" and set(s.servers) == {"a", "b"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"dc": "dc.one"}, "--dc: 'dc.one' is not a datacenter name"),
        ({"servers": ["node.1=10.0.0.1:8300"]}, "--servers: 'node.1' is not a Consul node name"),
        ({"servers": ["n1=10.0.0.1"]}, "has no port"),
        ({"servers": ["n1"]}, "is not NAME=HOST:PORT"),
        ({"listen": "1.2.3.4:99999"}, "out of range"),
        ({"listen": "not an address"}, "--listen"),
        ({"hello_timeout": "ten"}, "--hello-timeout: 'ten' is not a duration"),
        ({"max_connections": "0"}, "--max-connections: 0 must be at least 1"),
        ({"pump": "magic"}, "--pump: 'magic' is not one of auto, splice, userspace"),
        ({"gateways": ["dc1=10.0.0.1:8443"]}, "dc1 is the local datacenter"),
    ],
)
def test_errors_name_the_setting_and_the_fix(flags, message) -> None:
    flags = {"dc": "dc1", **flags}
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Settings.load(flags)


def test_file_errors(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("dc = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        Settings.load({}, config=bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('dc = "dc1"\nlisten_port = 1\n')
    with pytest.raises(SettingsError, match="unknown key 'listen_port'"):
        Settings.load({}, config=unknown)
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.load({}, config=tmp_path / "missing.toml")
    with pytest.raises(SettingsError, match="MESHGW_HELLO_TIMEOUT"):
        Settings.load({"dc": "dc1"}, environ={"MESHGW_HELLO_TIMEOUT": "-"})


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
    assert f"--listen 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


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
        {"dc": "dc1", "trust_domain": td, "gateways": ["dc2/ap1=10.2.1.1:443", "dc2=10.2.0.1:443"]}
    )
    table = RouteTable.build(merge([s.static_topology()], datacenter="dc1"))
    route = table.resolve(f"web.default.ap1.dc2.internal-v1.{td}")
    assert route is not None and [str(t.endpoint) for t in route.cluster.targets] == [
        "10.2.1.1:443"
    ]
    assert table.resolve(f"web.default.ap2.dc2.internal-v1.{td}") is None
    with pytest.raises(SettingsError, match="not a partition name"):
        Settings.load({"dc": "dc1", "gateways": ["dc2/a.b=10.0.0.1:443"]})
