"""Kubernetes containers read as the kubelet starts them: the settings `meshgw run` gets."""

from __future__ import annotations

import re
from typing import Any

from meshgw.settings import Settings

# What the downward API gives a container in these tests.
POD_IP = "10.1.2.3"
FIELDS = {"status.podIP": POD_IP, "metadata.name": "consul-server-0"}


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion, from the variables defined before."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
        else:
            env[item["name"]] = FIELDS[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def container_settings(container: dict[str, Any]) -> Settings:
    """The settings `meshgw run` (the image's ENTRYPOINT) starts with in `container`: its args
    parsed by the real command, its MESHGW_* variables as the environment."""
    from meshgw.cli import run

    env = container_env(container)
    args = [expand(str(a), env) for a in container.get("args", [])]
    with run.make_context("run", args) as ctx:
        flags = dict(ctx.params)
    config = flags.pop("config", None)
    assert config is None, "examples give every setting as a flag or variable"
    meshgw_env = {k: v for k, v in env.items() if k.startswith("MESHGW_")}
    return Settings.load(flags, environ=meshgw_env)
