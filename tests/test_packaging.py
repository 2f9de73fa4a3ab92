"""The packaging, as far as it can be checked without building an image.

The wheel (pure Python, as the image builds it; or the compiled wheel CI built, given in
MESHGW_X_TEST_WHEEL) installs, with its dependencies, into a fresh virtualenv and runs its own
build, where
`meshgw bench` finds the peer configurations it ships; the Dockerfile's ENTRYPOINT, run from that
virtualenv with the environment the Dockerfile sets, starts a gateway that answers /healthz, and
so does the Dockerfile's HEALTHCHECK command. The examples (TOML, Kubernetes env, systemd unit)
load as meshgw settings and agree with its defaults.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshgw import __version__
from meshgw.buildinfo import COMPILED, PURE
from meshgw.dataplane.budget import descriptors_for
from meshgw.settings import Settings
from tests.conftest import REPO, lines_until

DOCKERFILE = REPO / "Dockerfile"
EXAMPLES = REPO / "examples"
WAIT = 20.0
# A wheel CI has built (the compiled one): tested here instead of the pure one built here.
WHEEL_ENV = "MESHGW_X_TEST_WHEEL"
# pip's own words for "the index cannot be reached": the one reason to skip, not to fail.
OFFLINE = re.compile(
    r"Could not find a version that satisfies|No matching distribution found|"
    r"Failed to establish a new connection|Temporary failure in name resolution|"
    r"Network is unreachable|Max retries exceeded|Connection refused",
)


# --- the Dockerfile, read the way docker reads it (the few instructions used here) -------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    result = []
    for line in joined:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def dockerfile_env(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in instructions(text):
        if keyword != "ENV":
            continue
        words = shlex.split(rest)
        if words and "=" not in words[0]:  # the old `ENV KEY value` form
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def exec_form(text: str, keyword: str) -> list[str]:
    """The JSON array of ENTRYPOINT, or of HEALTHCHECK's CMD (after its options)."""
    for found, rest in instructions(text):
        if found == keyword:
            if keyword == "HEALTHCHECK":
                rest = rest[rest.index(" CMD ") + len(" CMD ") :]
            value = json.loads(rest)
            assert isinstance(value, list), f"{keyword} must use the exec (JSON) form"
            return [str(v) for v in value]
    raise AssertionError(f"no {keyword} in the Dockerfile")


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_dockerfile_shape(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    keywords = [k for k, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    user = [rest for k, rest in steps if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the image must not run as root"
    assert ("EXPOSE", "8443") in steps
    assert exec_form(dockerfile, "ENTRYPOINT") == ["meshgw", "run"]
    assert "/healthz" in " ".join(exec_form(dockerfile, "HEALTHCHECK"))
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    for keyword, rest in steps:  # everything copied exists and is let through .dockerignore
        if keyword == "COPY":
            for source in shlex.split(rest)[:-1]:
                assert (REPO / source).exists(), source
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and "!meshgw/" in ignore and "!pyproject.toml" in ignore


# --- a wheel, in a fresh virtualenv ------------------------------------------------------------


def run(
    args: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, env=env, cwd=cwd
    )


def require(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode == 0:
        return
    output = result.stdout + result.stderr
    if OFFLINE.search(output):
        pytest.skip(f"{what}: the package index cannot be reached here ({OFFLINE.search(output)})")
    raise AssertionError(f"{what} failed ({result.returncode}):\n{output[-3000:]}")


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # The venv first on PATH, as the image's /usr/local/bin; nothing of the checkout.
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MESHGW_", "CONSUL_", "PYTHON", "VIRTUAL_ENV"))
        }
        base["PATH"] = f"{self.bin}{os.pathsep}{base.get('PATH', '')}"
        return {**base, **(extra or {})}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    given = os.environ.get(WHEEL_ENV)
    if given:
        wheels = [Path(given)]
    else:
        # Build from a copy of what the Dockerfile copies, so the checkout gets no build/ or
        # egg-info, and a file the image would lack fails here too.
        source = root / "src"
        source.mkdir()
        for name in ("pyproject.toml", "setup.py", "README.md"):
            shutil.copy2(REPO / name, source / name)
        shutil.copytree(
            REPO / "meshgw", source / "meshgw", ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
        dist = root / "dist"
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(source)]
        # Pure Python, as the image builds it (python:3.11-slim has no C compiler); CI hands
        # the compiled wheel over through WHEEL_ENV.
        env = {**os.environ, "MESHGW_X_PURE": "1"}
        require(run([*pip_wheel, "-w", str(dist)], timeout=240, env=env), "pip wheel")
        wheels = list(dist.glob("meshgw-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    require(run([sys.executable, "-m", "venv", str(venv)], timeout=120), "python -m venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheels[0])]
    install = run(pip, timeout=300)
    require(install, "pip install of the wheel")
    return Installed(venv, wheels[0])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_with_its_console_script(installed: Installed, tmp_path: Path) -> None:
    version = run([str(installed.bin / "meshgw"), "--version"], WAIT, env=installed.env())
    assert version.returncode == 0, version.stderr
    # A platform wheel runs its compiled modules (nothing shadows them); a pure one has none.
    build = PURE if installed.wheel.name.endswith("-py3-none-any.whl") else COMPILED
    assert version.stdout == f"meshgw, version {__version__}, {build}\n"
    where = run(
        [str(installed.bin / "python"), "-c", "import meshgw; print(meshgw.__file__)"],
        WAIT,
        env=installed.env(),
        cwd=tmp_path,
    )
    assert "site-packages" in where.stdout, where.stdout + where.stderr
    for command in (["run", "--help"], ["demo", "--help"], ["tls", "--help"]):
        helped = run([str(installed.bin / "meshgw"), *command], WAIT, env=installed.env())
        assert helped.returncode == 0, helped.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_installed_bench_finds_its_peer_configurations(
    installed: Installed, tmp_path: Path
) -> None:
    """From any folder, with no peer on PATH: each peer is skipped as not installed."""
    out = tmp_path / "bench.json"
    env = installed.env({"PATH": str(installed.bin)})  # the venv only: no peer, no cc
    bench = [str(installed.bin / "meshgw"), "bench", "--scenarios", "rate-classic"]
    bench += ["--duration", "0.2", "--repeat", "1", "--against", "haproxy,nginx,envoy,sniproxy"]
    done = run([*bench, "--json", str(out)], 120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    notes = json.loads(out.read_text())["notes"]
    for peer in ("haproxy", "nginx", "envoy", "sniproxy"):
        assert any(n.startswith(f"{peer} skipped: {peer} is not installed") for n in notes), notes
    assert not any("no configuration" in n for n in notes), notes


@dataclass
class Started:
    proc: subprocess.Popen[str]
    admin: str


@pytest.fixture
def entrypoint(installed: Installed, dockerfile: str, tmp_path: Path) -> Iterator[Started]:
    """The image's ENTRYPOINT with the image's environment, plus MESHGW_DC."""
    env = installed.env(
        {
            **dockerfile_env(dockerfile),
            "MESHGW_DC": "dc1",
            # The image's ports are the container's own; on a shared test machine the kernel
            # picks free ones instead.
            "MESHGW_LISTEN": "127.0.0.1:0",
            "MESHGW_ADMIN": "127.0.0.1:0",
        }
    )
    proc = subprocess.Popen(
        exec_form(dockerfile, "ENTRYPOINT"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        seen = lines_until(proc.stderr, lambda line: "meshgw listening" in line, WAIT)
        assert seen and "meshgw listening" in seen[-1], "not listening:\n" + "".join(seen)
        record = json.loads(seen[-1])  # the Dockerfile sets MESHGW_LOG_FORMAT=json
        assert record["msg"] == "meshgw listening"
        yield Started(proc, record["admin"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(WAIT)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_entrypoint_answers_healthz_and_the_healthcheck_passes(
    entrypoint: Started, installed: Installed, dockerfile: str
) -> None:
    with urllib.request.urlopen(f"http://{entrypoint.admin}/healthz", timeout=WAIT) as response:
        assert response.status == 200
        assert response.read() == b"ok\n"
    env = installed.env({**dockerfile_env(dockerfile), "MESHGW_ADMIN": entrypoint.admin})
    check = run(exec_form(dockerfile, "HEALTHCHECK"), WAIT, env=env)
    assert check.returncode == 0, check.stderr
    # And it fails when nothing answers, or it would check nothing.
    env["MESHGW_ADMIN"] = "127.0.0.1:1"
    assert run(exec_form(dockerfile, "HEALTHCHECK"), WAIT, env=env).returncode != 0
    entrypoint.proc.send_signal(signal.SIGTERM)  # drains, exits 0
    assert entrypoint.proc.wait(WAIT) == 0


# --- the examples ------------------------------------------------------------------------------


def test_example_toml_loads() -> None:
    settings = Settings.load(config=EXAMPLES / "meshgw.toml")
    assert settings.dc == "dc2" and settings.primary_dc == "dc1"
    assert settings.expose_servers
    assert set(settings.server) == {"consul-server-0", "consul-server-1", "consul-server-2"}
    assert [str(a) for a in settings.gateway["dc1"]] == ["203.0.113.5:443", "203.0.113.6:443"]
    assert settings.idle_timeout is None
    # Every commented-out key is a setting too, so that uncommenting one cannot break the file.
    text = (EXAMPLES / "meshgw.toml").read_text()
    commented = re.findall(r"^# ([a-z_]+) = ", text, re.M)
    assert commented
    known = set(Settings.__dataclass_fields__)
    assert set(commented) <= known, set(commented) - known


def test_environment_style_loads() -> None:
    environ = {
        "MESHGW_DC": "dc1",
        "MESHGW_EXPOSE_SERVERS": "1",
        "MESHGW_SERVER": "a=1.2.3.4:8300,b=1.2.3.5:8300",
        "MESHGW_GATEWAY": "dc2=5.6.7.8:443,dc2=5.6.7.9:443",
        "MESHGW_DRAIN_TIMEOUT": "20s",
    }
    settings = Settings.load(environ=environ)
    assert settings.expose_servers and settings.drain_timeout == 20
    assert {k: str(v) for k, v in settings.server.items()} == {
        "a": "1.2.3.4:8300",
        "b": "1.2.3.5:8300",
    }
    assert [str(a) for a in settings.gateway["dc2"]] == ["5.6.7.8:443", "5.6.7.9:443"]


K8S_ENV = re.compile(r'^\s*(?:# )?- \{name: (MESHGW_\w+), value: "?([^"}]*)"?\}', re.M)


def test_kubernetes_sidecar_env_is_meshgw_settings() -> None:
    text = (EXAMPLES / "kubernetes" / "consul-server-sidecar.yaml").read_text()
    pairs = K8S_ENV.findall(text)
    names = {name for name, _ in pairs}
    assert {"MESHGW_DC", "MESHGW_EXPOSE_SERVERS", "MESHGW_SERVER", "MESHGW_ADMIN"} <= names
    known = {"MESHGW_" + name.upper() for name in Settings.__dataclass_fields__}
    assert names <= known, names - known
    # The kubelet expands $(POD_IP); every value, the commented ones too, must then load.
    environ = {name: value.replace("$(POD_IP)", "10.1.2.3") for name, value in pairs}
    settings = Settings.load(environ=environ)
    assert settings.admin.host == "0.0.0.0"  # the kubelet's httpGet probes reach the admin face
    assert len(settings.server) == 3
    grace = re.search(r"terminationGracePeriodSeconds: (\d+)", text)
    assert grace and int(grace.group(1)) > settings.drain_timeout
    assert "path: /ready" in text and "path: /healthz" in text
    assert re.search(r"port: 443, targetPort: wan", text)
    assert re.search(r"name: wan, containerPort: 8443", text)
    assert "type: LoadBalancer" in text and "kind: StatefulSet" in text


def test_systemd_unit_matches_meshgw() -> None:
    unit: dict[str, list[str]] = {}
    for line in (EXAMPLES / "systemd" / "meshgw.service").read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            unit.setdefault(key, []).append(value)
    assert unit["ExecStart"] == ["/usr/local/bin/meshgw run --config /etc/meshgw/meshgw.toml"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"]
    defaults = Settings()
    assert float(unit["TimeoutStopSec"][0].rstrip("s")) > defaults.drain_timeout
    # Room for tens of thousands of connections per process (two descriptors each, and pipes).
    assert int(unit["LimitNOFILE"][0]) >= descriptors_for(16384)
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["User"] != ["root"]
