"""Consul's flag spelling for click commands, and one-line errors.

Consul's commands parse flags with Go's `flag` package, so its docs write `-server -dc dc2
-additional-dnsname x`; Go takes `--server` and `-dc=dc2` just as well, and a boolean flag may be
spelled `-server=true`. `GoFlagCommand` accepts all of these by rewriting a one-dash long flag to
its two-dash click name before click parses: only where a flag can stand, never a flag's value
(`-additional-dnsname -x` keeps `-x`) and never after `--`.

Every usage error (an unknown flag, a missing or malformed value, flags that do not go together)
is one `meshgw: error: ...` line on stderr and exit status 2; `CommandError` carries other failures
with their own status. Neither prints click's usage block or a traceback.
"""

from __future__ import annotations

from typing import IO, Any

import click

EXIT_FAILED = 1
EXIT_USAGE = 2

# strconv.ParseBool, which Go's flag package uses for `-flag=value`.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class CommandError(click.ClickException):
    """One `meshgw: error: <message>` line on stderr, then exit status 1."""

    exit_code = EXIT_FAILED

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"meshgw: error: {self.format_message()}", file=file, err=file is None)


class CommandUsageError(CommandError):
    """The same line, then exit status 2: the command line itself is wrong."""

    exit_code = EXIT_USAGE


def usage_error(error: click.UsageError, ctx: click.Context) -> CommandUsageError:
    message = error.format_message().rstrip(".")
    return CommandUsageError(f"{message} (see {ctx.command_path} --help)")


def _takes_value(command: click.Command) -> dict[str, bool]:
    """Every two-dash option name of `command` → whether it takes a value."""
    names: dict[str, bool] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                if opt.startswith("--"):
                    names[opt] = not (param.is_flag or param.count)
    return names


def _go_bool(flag: str, value: str) -> bool:
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise CommandUsageError(
        f"invalid boolean value {value!r} for {flag}: give true or false, or just {flag}"
    )


def go_style(
    args: list[str], takes_value: dict[str, bool], *, stop_at_word: bool = False
) -> list[str]:
    """`args` with Go's spellings turned into click's: `-name` → `--name`, `-name=v` →
    `--name=v`, and a boolean `--name=false` dropped (`=true` kept as `--name`).
    `stop_at_word`: a group's arguments end at the subcommand's name; the rest is the
    subcommand's to read."""
    out: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg == "--" or (stop_at_word and not arg.startswith("-")):
            out.append(arg)
            out.extend(rest)
            break
        if len(arg) > 2 and arg[0] == "-" and arg[1] != "-":
            arg = "-" + arg  # Go: one dash or two, the same flag
        name, has_value, value = arg.partition("=")
        wants_value = takes_value.get(name)
        if wants_value is None:  # not a flag of ours: click reports it if it is one at all
            out.append(arg)
        elif not wants_value and has_value:
            if _go_bool(name, value):
                out.append(name)
        else:
            out.append(arg)
            if wants_value and not has_value:
                following = next(rest, None)
                if following is not None:
                    out.append(following)  # a value, however it is spelled
    return out


class GoFlagCommand(click.Command):
    """A click command that takes Consul's flag spelling and reports usage errors in one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, go_style(args, _takes_value(self)))
        except click.UsageError as error:
            raise usage_error(error, ctx) from None


class GoFlagGroup(click.Group):
    """A click group whose usage errors (an unknown subcommand, say) are one line too, and whose
    subcommands are `GoFlagCommand`s and `GoFlagGroup`s."""

    command_class = GoFlagCommand
    group_class = type

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            own = go_style(args, _takes_value(self), stop_at_word=True)
            return super().parse_args(ctx, own)
        except click.UsageError as error:
            raise usage_error(error, ctx) from None

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as error:
            raise usage_error(error, ctx) from None
