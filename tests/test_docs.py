"""The operator's docs say only what meshgw does: every `meshgw ...` command in them parses with
the real command line (and the `meshgw tls` ones run as written), every meshgw container in their
YAML loads as meshgw settings, and the flag table names real flags."""

from __future__ import annotations

import os
import re
import shlex
import textwrap
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from meshgw import settings_reference
from meshgw.cli import main
from meshgw.control.consul import config as consul_client
from meshgw.settings import Settings
from tests.conftest import REPO
from tests.k8s import container_settings

DOCS = [REPO / "README.md", REPO / "docs" / "federation.md", REPO / "docs" / "kubernetes.md"]
# A fenced block, also indented inside a list item.
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
HELM_GRACE = 30  # terminationGracePeriodSeconds of the chart's server pods (docs/kubernetes.md)


def code_blocks(path: Path, *languages: str) -> list[str]:
    return [
        textwrap.dedent(body)
        for _, lang, body in FENCE.findall(path.read_text())
        if lang in languages
    ]


def meshgw_commands(path: Path) -> list[list[str]]:
    """The words of every `meshgw ...` command: in shell blocks (continuation lines joined,
    one command per `&&`, `|` or `;`, also after `kubectl exec ... --`) and in inline code."""
    text = path.read_text()
    lines: list[str] = []
    for body in code_blocks(path, "sh", "shell", "console", ""):
        lines += body.replace("\\\n", " ").splitlines()
    prose = FENCE.sub("", text)
    lines += [m for m in re.findall(r"`([^`\n]+)`", prose) if m.startswith("meshgw ")]
    commands = []
    for line in lines:
        words = shlex.split(line.removeprefix("$ "), comments=True)
        command: list[str] = []
        for word in [*words, ";"]:
            if word in ("&&", "||", "|", ";"):
                starts = [
                    i
                    for i, w in enumerate(command)
                    if w == "meshgw" and (i == 0 or command[i - 1] in ("--", "sudo"))
                ]
                if starts:
                    commands.append(command[starts[0] :])
                command = []
            else:
                command.append(word)
    return commands


def parse(words: list[str]) -> tuple[click.Command, dict[str, Any]]:
    """Resolve `meshgw <group>... <command> <flags>` and parse the flags as click would."""
    assert words[0] == "meshgw"
    command: click.Command = main
    rest = words[1:]
    path = ["meshgw"]
    while isinstance(command, click.Group) and not (rest and rest[0].startswith("-")):
        assert rest, f"{' '.join(words)}: a group without its command"
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"{' '.join(words)}: no command {rest[0]!r}"
        path.append(rest[0])
        command, rest = sub, rest[1:]
    try:
        with command.make_context(" ".join(path), rest) as ctx:
            return command, dict(ctx.params)
    except click.exceptions.Exit:  # --help
        return command, {}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_meshgw_command_in_the_docs_parses(path: Path) -> None:
    commands = meshgw_commands(path)
    assert commands, f"no meshgw command found in {path}"
    for words in commands:
        try:
            command, params = parse(words)
        except click.ClickException as error:
            message = error.format_message()
            raise AssertionError(f"{path.name}: {shlex.join(words)}: {message}") from None
        if command.name in ("run", "routes"):
            flags = {
                k: v
                for k, v in params.items()
                if k in Settings.__dataclass_fields__ and v not in (None, (), [])
            }
            # A whole command line loads; `meshgw run` named in prose, or with the reader's own
            # --config file, is only parsed.
            if flags and params.get("config") is None:
                Settings.load(flags, environ={})


def test_the_parser_refuses_what_meshgw_refuses() -> None:
    with pytest.raises(click.ClickException):
        parse(["meshgw", "doctor", "--ca-fil", "x"])
    with pytest.raises(AssertionError):
        parse(["meshgw", "nonsense"])
    assert meshgw_commands(REPO / "docs" / "kubernetes.md")[-1][:2] == ["meshgw", "doctor"]


def test_federation_certificate_commands_run_as_written(tmp_path: Path) -> None:
    commands = [c for c in meshgw_commands(REPO / "docs" / "federation.md") if c[1] == "tls"]
    assert len(commands) == 5
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        for words in commands:
            result = CliRunner().invoke(main, words[1:], catch_exceptions=False)
            assert result.exit_code == 0, (words, result.output)
    finally:
        os.chdir(old)
    made = sorted(p.name for p in (tmp_path / "certs").glob("*.pem"))
    assert "dc1-server-consul-2-key.pem" in made and "dc2-server-consul-0.pem" in made
    # The file names the server settings below them read.
    text = (REPO / "docs" / "federation.md").read_text()
    for name in re.findall(r"/etc/consul\.d/tls/([\w.-]+\.pem)", text):
        assert name in made, name


def helm_meshgw_containers() -> list[dict[str, Any]]:
    found = []
    for body in code_blocks(REPO / "docs" / "kubernetes.md", "yaml"):
        document = yaml.safe_load(body)
        server = document.get("server") or {}
        found += [c for c in server.get("extraContainers", []) if c["image"].startswith("meshgw")]
    return found


def test_helm_values_run_a_registering_gateway() -> None:
    containers = helm_meshgw_containers()
    assert len(containers) == 2  # the primary's and the secondary's
    for body in code_blocks(REPO / "docs" / "kubernetes.md", "yaml"):
        values = yaml.safe_load(body)
        if "server" not in values:
            continue
        assert values["meshGateway"] == {"enabled": False}
        assert values["global"]["federation"] == {"enabled": False}
        assert "enable_mesh_gateway_wan_federation" in values["server"]["extraConfig"]
        (container,) = values["server"]["extraContainers"]
        settings = container_settings(container)
        assert settings.warnings() == []
        assert settings.register and settings.expose_servers and settings.wan_address
        assert settings.consul == "https://127.0.0.1:8501" and settings.ca_file
        assert settings.drain_delay + settings.drain_timeout + 5 <= HELM_GRACE
        assert settings.admin.host == "0.0.0.0"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert settings.token_file and settings.ca_file
        token_dir = settings.token_file.rpartition("/")[0]
        (extra,) = values["server"]["extraVolumes"]
        assert mounts[token_dir] == f"userconfig-{extra['name']}"  # the chart's volume name
        assert mounts[settings.ca_file.rpartition("/")[0]] == "consul-ca-cert"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["admin"] == settings.admin.port and ports["wan"] == settings.listen.port
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        context = container["securityContext"]
        assert context["runAsNonRoot"] and context["allowPrivilegeEscalation"] is False
        if settings.primary_dc is not None:  # the secondary bootstraps by the primary's gateway
            primaries = [str(a) for a in settings.primary_gateway]
            assert (
                f'"primary_gateways": {primaries}'.replace("'", '"')
                in values["server"]["extraConfig"]
            )


# --- the flag table ---------------------------------------------------------------------------

CONSUL_FLAGS = [
    "-register",
    "-service",
    "-proxy-id",
    "-address",
    "-wan-address",
    "-bind-address",
    "-expose-servers",
    "-deregister-after-critical",
    "-admin-bind",
    "-http-addr",
    "-token",
    "-token-file",
    "-ca-file",
    "-ca-path",
    "-client-cert",
    "-client-key",
    "-tls-server-name",
    "-grpc-addr",
    "-gateway=mesh",
    "-node-name",
]


def flag_table() -> list[tuple[str, str, str]]:
    text = (REPO / "docs" / "federation.md").read_text()
    section = text[text.index("## 5. From `consul connect envoy") : text.index("## 6.")]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `-"):
            consul, meshgw, why = (cell.strip() for cell in line.strip("|").split("|", 2))
            rows.append((consul, meshgw, why))
    return rows


def test_every_consul_flag_is_mapped() -> None:
    named = {flag for consul, _, _ in flag_table() for flag in re.findall(r"`(-[^`]+)`", consul)}
    missing = [flag for flag in CONSUL_FLAGS if flag not in named]
    assert not missing, missing


def test_the_table_names_real_meshgw_flags_and_variables() -> None:
    from meshgw.cli import run

    flags = {opt for param in run.params for opt in getattr(param, "opts", [])}
    variables = {v for k, v in vars(consul_client).items() if k.startswith("ENV_")}
    for consul, meshgw, why in flag_table():
        if meshgw == "—":
            assert why.startswith(("not needed", "not supported")), consul
            continue
        for name in re.findall(r"`([^`]+)`", meshgw):
            assert name in flags or name in variables, (consul, name)


def test_the_settings_reference_is_current() -> None:
    """docs/settings.md is generated from the settings' declarations; regenerate it with
    `python -m meshgw.settings_reference > docs/settings.md` after changing one."""
    assert (REPO / "docs" / "settings.md").read_text() == settings_reference.render()
