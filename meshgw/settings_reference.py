"""docs/settings.md, written from the settings' own declarations (settings.py): every setting's
TOML key, flag, variable, default and meaning, so the reference cannot drift from the code
(tests/test_docs.py checks the file is current).

    python -m meshgw.settings_reference > docs/settings.md
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meshgw.settings import CONFIG_ENV, CONSUL_ADDR_ENV, ENV_PREFIX, GROUPS

HEADER = f"""\
# meshgw's settings

Every setting has one name, whichever way it is given: the TOML key `hello_timeout` (or
`hello-timeout`) in the file `--config` or `{CONFIG_ENV}` names, the variable
`{ENV_PREFIX}HELLO_TIMEOUT`, the flag `--hello-timeout`. Later layers win: defaults < file <
environment < flags. A repeatable setting is singular everywhere (`--server`, `server`,
`{ENV_PREFIX}SERVER`): repeat the flag, give the key a list, separate the variable's values with
commas. Durations read as Consul's do (`5s`, `1m30s`, `250ms`; a bare number is seconds). A key or
variable that is not a setting, or a value out of range, stops `meshgw run` with one line naming it
and the fix, and exit status 2.

`{CONSUL_ADDR_ENV}` alone turns Consul discovery on, as it does for Consul's own tools; the token
and TLS files then come from `--token-file` and `--ca-file` or the usual `CONSUL_HTTP_TOKEN`,
`CONSUL_HTTP_TOKEN_FILE`, `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`.

SIGHUP re-reads the settings file without dropping a connection: routes and registration change
in place, a bad value is refused with the running settings kept, and a setting marked *restart*
(read once at start) keeps its running value, with a warning naming it.

This page is generated from `meshgw/settings.py` (`python -m meshgw.settings_reference`).
"""


def _default(spec: dataclasses.Field[Any]) -> str:
    """A value as code; a description of where the default comes from as prose."""
    shown = spec.metadata["show"] or ""
    return shown if " " in shown or not shown else f"`{shown}`"


def _meaning(spec: dataclasses.Field[Any]) -> str:
    meta = spec.metadata
    text = meta["help"]
    choices = getattr(meta["parse"], "choices", None)
    if choices:
        text += f" One of {', '.join(f'`{c}`' for c in choices)}."
    default = spec.default if spec.default is not dataclasses.MISSING else None
    if default is None and spec.default_factory is not dataclasses.MISSING:
        text += " Repeatable."
    return text.replace("<", "\\<")  # <cluster-id> is a placeholder, not an HTML tag


def _row(spec: dataclasses.Field[Any]) -> str:
    name, meta = spec.name, spec.metadata
    flag = "--" + name.replace("_", "-")
    if meta["metavar"]:
        flag += f" {meta['metavar']}"
    restart = "restart" if meta["restart"] else ""
    variable = ENV_PREFIX + name.upper()
    cells = (f"`{name}`", f"`{flag}`", f"`{variable}`", _default(spec), restart, _meaning(spec))
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def render() -> str:
    parts = [HEADER]
    for title, group in GROUPS:
        parts.append(f"\n## {title}\n\n{(group.__doc__ or '').strip()}\n\n")
        parts.append("| key | flag | variable | default | reload | meaning |\n")
        parts.append("|---|---|---|---|---|---|\n")
        parts.extend(_row(spec) + "\n" for spec in dataclasses.fields(group))
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")
