"""`meshgw health`: the admin address comes from the gateway's own settings, however given."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshgw.addresses import Address
from meshgw.cli import main
from meshgw.healthcheck import HealthError, admin_url, run_arguments
from tests.conftest import lines_until, terminate

WAIT = 20.0

pytestmark = pytest.mark.timeout(120)


def test_run_arguments_of_every_way_to_start_meshgw() -> None:
    flags = ["--admin", "0.0.0.0:9000"]
    assert run_arguments(["/usr/local/bin/meshgw", "run", *flags]) == flags
    assert run_arguments(["/usr/bin/python3", "/usr/local/bin/meshgw", "run", *flags]) == flags
    assert run_arguments(["python", "-m", "meshgw", "run"]) == []
    assert run_arguments(["/sbin/docker-init", "--", "meshgw", "run", *flags]) == flags  # --init
    assert run_arguments(["sh", "-c", "meshgw run"]) is None
    assert run_arguments(["meshgw", "routes", "run"]) is None
    assert run_arguments([]) is None


@pytest.mark.parametrize(
    ("admin", "url"),
    [
        (Address("0.0.0.0", 19100), "http://127.0.0.1:19100/healthz"),
        (Address("::", 19100), "http://[::1]:19100/healthz"),
        (Address("10.1.2.3", 9), "http://10.1.2.3:9/healthz"),
        (Address("localhost", 9), "http://localhost:9/healthz"),
    ],
)
def test_admin_url_reaches_a_wildcard_bind_on_loopback(admin: Address, url: str) -> None:
    assert admin_url(admin, "/healthz") == url


def test_admin_port_zero_cannot_be_asked() -> None:
    with pytest.raises(HealthError, match="port 0"):
        admin_url(Address("127.0.0.1", 0), "/healthz")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHGW_", "CONSUL_"))}
    base = {"MESHGW_LISTEN": "127.0.0.1:0", "MESHGW_WORKERS": "1", "MESHGW_DRAIN_DELAY": "0"}
    return {**env, **base, **extra}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshgw", "run", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        started.append(proc)
        assert proc.stderr is not None
        seen = lines_until(proc.stderr, lambda line: "meshgw listening" in line, WAIT)
        assert seen and "meshgw listening" in seen[-1], "".join(seen)
        return proc

    yield start
    for proc in started:
        terminate(proc, WAIT)


def health(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshgw", "health", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
        env=env or base_env(),
    )


def test_it_follows_a_flag_over_the_environment(gateway) -> None:
    """`docker run meshgw --admin ...`: the flag wins over MESHGW_ADMIN, as in `meshgw run`."""
    port, decoy = free_port(), free_port()
    env = base_env(MESHGW_DC="dc1", MESHGW_ADMIN=f"127.0.0.1:{decoy}")
    proc = gateway(["--admin", f"127.0.0.1:{port}"], env)
    done = health("--pid", str(proc.pid))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"http://127.0.0.1:{port}/healthz: 200\n"
    # Its own environment alone would ask the decoy, where nothing answers.
    alone = health(env=env)
    assert alone.returncode == 1
    assert alone.stderr.startswith(f"http://127.0.0.1:{decoy}/healthz: no answer")


def test_it_follows_a_relative_config_file_and_a_wildcard_bind(gateway, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "meshgw.toml").write_text(f'dc = "dc1"\nadmin = "0.0.0.0:{port}"\n')
    proc = gateway(["--config", "meshgw.toml"], base_env())  # relative to the gateway's cwd
    done = health("--pid", str(proc.pid))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"http://127.0.0.1:{port}/healthz: 200\n"
    # /ready: no routes in these settings, so not ready, and said so.
    ready = health("--pid", str(proc.pid), "--ready")
    assert ready.returncode == 1
    assert ready.stderr.startswith(f"http://127.0.0.1:{port}/ready: 503")


def test_it_follows_the_environment_alone(gateway) -> None:
    port = free_port()
    env = base_env(MESHGW_DC="dc1", MESHGW_ADMIN=f"127.0.0.1:{port}")
    proc = gateway([], env)
    assert health(env=env).returncode == 0
    assert health("--pid", str(proc.pid)).returncode == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 0
    gone = health("--pid", str(proc.pid))
    assert gone.returncode == 1
    assert gone.stderr == f"meshgw: unhealthy: there is no process {proc.pid}\n"


def test_a_process_that_is_not_meshgw(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["health", "--pid", str(os.getpid())])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"meshgw: unhealthy: process {os.getpid()} is not `meshgw run`")


def test_settings_that_do_not_load_are_unhealthy() -> None:
    done = health(env=base_env(MESHGW_DC="dc1", MESHGW_ADMIN="nowhere"))
    assert done.returncode == 1
    assert done.stderr.startswith("meshgw: unhealthy: MESHGW_ADMIN: ")
    assert done.stderr.count("\n") == 1
