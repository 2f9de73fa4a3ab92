"""`meshgw bench`: measure meshgw against its peers on this machine, on loopback."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import click

from meshgw import __version__
from meshgw.bench import harness, peers, report, scenarios
from meshgw.dataplane.kernelplane import pump_unavailable

PLOT_NEEDS = "pip install 'meshgw[bench]'"
SHARED_NOTE = (
    "‡ during a run of this median, processes other than the bench's used ≥ "
    f"{harness.SHARED_FRACTION:.0%} of all CPUs: the machine CPU figures include their work."
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _choose_targets(
    against: str, config_dir: Traversable, notes: list[str]
) -> tuple[list[str], dict[str, peers.Peer]]:
    """The subject first, then what `--against` names and is here to run; peers found."""
    known = peers.targets()
    wanted = [t.strip() for t in against.split(",") if t.strip() and t.strip() != peers.SUBJECT]
    unknown = [t for t in wanted if t not in known]
    if unknown:
        raise click.BadParameter(
            f"unknown {', '.join(unknown)}; choose from {', '.join(known[1:])}",
            param_hint="--against",
        )
    targets = [peers.SUBJECT]
    found: dict[str, peers.Peer] = {}
    modes = peers.meshgw_targets()
    for name in dict.fromkeys(wanted):
        if peers.is_peer(name):
            peer = peers.find_peer(name, config_dir)
            if isinstance(peer, str):
                notes.append(f"{name} skipped: {peer}")
                continue
            found[name] = peer
        elif name in modes and (reason := pump_unavailable(modes[name])):
            notes.append(f"{name} skipped: {reason}")  # it would measure another mode
            continue
        targets.append(name)
    return targets, found


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _pinning(proxy: str, load: str, notes: list[str]) -> tuple[list[int] | None, list[int] | None]:
    parsed: dict[str, list[int]] = {}
    for option, text in (("--proxy-cpus", proxy), ("--load-cpus", load)):
        try:
            parsed[option] = harness.parse_cpus(text)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint=option) from None
    proxy_cpus, load_cpus = parsed["--proxy-cpus"], parsed["--load-cpus"]
    usable = os.sched_getaffinity(0)
    missing = sorted((set(proxy_cpus) | set(load_cpus)) - usable)
    if missing:
        notes.append(f"CPUs {missing} are not available here ({sorted(usable)}): no pinning")
        return None, None
    if set(proxy_cpus) & set(load_cpus):
        notes.append("proxy and load share CPUs: figures are not isolated")
    return proxy_cpus, load_cpus


@click.command("bench")
@click.option(
    "--scenarios",
    "scenario_names",
    default=",".join(scenarios.DEFAULT_SCENARIOS),
    show_default=True,
    help="Scenarios (rate, bulk, rr, idle, syscalls) or single variants (rate-mlkem, rr-1...).",
)
@click.option(
    "--duration", type=float, default=5.0, show_default=True, help="Seconds of each timed run."
)
@click.option(
    "--repeat",
    type=click.IntRange(1, 50),
    default=3,
    show_default=True,
    help="Runs of each variant per target; medians and min-max are reported.",
)
@click.option(
    "--against",
    default=",".join(peers.targets()[1:]),
    show_default=True,
    help="What meshgw (its default pump mode) is compared with: meshgw in each other pump mode, "
    "direct (no proxy) and peers; absent peers are skipped.",
)
@click.option(
    "--proxy-cpus",
    default="1",
    show_default=True,
    metavar="LIST",
    help="CPUs the proxy under test is pinned to.",
)
@click.option(
    "--load-cpus",
    default="0",
    show_default=True,
    metavar="LIST",
    help="CPUs the load generator and the backend are pinned to.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Passed to `meshgw run --workers N`.",
)
@click.option(
    "--idle-connections",
    type=click.IntRange(1, 9500),
    default=9000,
    show_default=True,
    help="Connections the idle scenario holds.",
)
@click.option(
    "--syscall-connections",
    type=click.IntRange(10, 100000),
    default=2000,
    show_default=True,
    help="Rate connections the syscalls scenario traces.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Write every run, the medians and the goals as JSON.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help=f"Draw the main figures as a PNG (needs matplotlib: {PLOT_NEEDS}).",
)
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(dir_okay=False),
    help="Write the tables as Markdown.",
)
@click.option(
    "--configs",
    type=click.Path(file_okay=False, exists=True),
    help="Folder of the peer configuration templates [the ones shipped with meshgw].",
)
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(dir_okay=False),
    help="Record meshgw with py-spy during rate-classic #1 (raw stacks to FILE; top-10 shown).",
)
@click.option("--keep", is_flag=True, help="Keep the work folder (configs, logs).")
def bench_command(
    scenario_names: str,
    duration: float,
    repeat: int,
    against: str,
    proxy_cpus: str,
    load_cpus: str,
    workers: int,
    idle_connections: int,
    syscall_connections: int,
    json_path: str | None,
    plot_path: str | None,
    markdown_path: str | None,
    configs: str | None,
    profile_path: str | None,
    keep: bool,
) -> None:
    """Measure meshgw against direct loopback and peer SNI routers.

    A C load generator and backend (compiled on first use with `cc`) drive each scenario; the
    proxy and the load run pinned to separate CPUs. meshgw runs once per pump mode
    (meshgw-splice...; plain meshgw is its default mode). Prints the ratio of meshgw to each
    other target per figure, CPU both the proxy's own and the whole machine's; † marks medians
    where a run was load-bound (the load side, not the proxy, was the limit: compare the
    CPU-normalised figures there), ‡ those where other processes were busy on the machine.
    """
    if plot_path and not _can_plot():  # before anything runs, not after an hour of runs
        click.echo(f"meshgw bench: --plot needs matplotlib: {PLOT_NEEDS}", err=True)
        sys.exit(2)
    if duration <= 0 or duration > 600:
        raise click.BadParameter("must be in (0, 600]", param_hint="--duration")
    notes: list[str] = []
    try:
        variants = scenarios.select(
            [n.strip() for n in scenario_names.split(",") if n.strip()], idle_connections
        )
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--scenarios") from None
    config_dir = Path(configs) if configs else peers.default_config_dir()
    targets, found = _choose_targets(against, config_dir, notes)
    proxy_set, load_set = _pinning(proxy_cpus, load_cpus, notes)
    if load_set:
        os.sched_setaffinity(0, load_set)  # this harness is load-side work too
    pumps = {t: mode for t, mode in peers.meshgw_targets().items() if t in targets}
    versions = {**{t: __version__ for t in pumps}, **{n: p.version for n, p in found.items()}}
    if any(v.scenario == "syscalls" for v in variants) and shutil.which("strace") is None:
        notes.append("syscalls skipped: strace is not installed (apt-get install strace)")
        variants = [v for v in variants if v.scenario != "syscalls"]
    if workers > 1:
        notes.append(f"meshgw runs with --workers {workers}; peers run on one core each")

    tool = harness.LoadTool.find()
    if tool.note:
        notes.append(tool.note)
    workdir = Path(tempfile.mkdtemp(prefix="meshgw-bench-"))
    build = harness.meshgw_build(workdir) if pumps else None
    settings = harness.BenchSettings(
        tool=tool,
        hellos=harness.Hellos.write(workdir),
        workdir=workdir,
        proxy_cpus=proxy_set,
        load_cpus=load_set,
        workers=workers,
        peers=found,
        pumps=pumps,
        profile=Path(profile_path).resolve() if profile_path else None,
    )
    plans = [
        harness.RunPlan(v, t, r, duration, syscall_connections)
        for r in range(1, repeat + 1)
        for v in variants
        for t in targets
        # direct has no proxy to measure memory or system calls of; one trace is enough
        if not (t == peers.DIRECT and v.scenario in ("idle", "syscalls"))
        and not (v.scenario == "syscalls" and r > 1)
    ]
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "build": build,  # of meshgw: compiled (mypyc) or pure Python
        "load_tool": tool.kind,
        "proxy_cpus": proxy_set,
        "load_cpus": load_set,
        "duration_s": duration,
        "repeat": repeat,
        "pump_modes": pumps,
        "workers": workers,
        "hello_bytes": {
            "classic": settings.hellos.size("reply", "classic"),
            "mlkem": settings.hellos.size("reply", "mlkem"),
        },
        "loadavg_start": _loadavg(),
        "argv": sys.argv[1:],
    }
    progress = report.Progress(len(plans))
    header = f"meshgw {__version__}, {build}, Python {meta['python']}" if build else ""
    if header:
        progress.note(header)
    for note in notes:
        progress.note(f"note: {note}")
    runs: list[dict[str, Any]] = []
    # SIGTERM (kill, a CI timeout) takes the Ctrl-C path: children stopped, the runs so far
    # reported.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for plan in plans:
            progress.start(plan.variant.name, plan.target, plan.repeat)
            run = harness.run_once(plan, settings)
            runs.append(run)
            progress.done(run)
    except KeyboardInterrupt:
        progress.note("interrupted: reporting the runs so far")
    finally:
        # An interrupt can cut a run short between starting a child and handing it to the
        # code that stops it: stop and reap whatever is left, so none outlives the bench.
        left = harness.stop_all()
    if left:
        progress.note(f"stopped at exit: {', '.join(left)}")
    meta["loadavg_end"] = _loadavg()

    summary = report.summarise(runs)
    goals = report.evaluate_goals(summary)
    breakdown = report.syscall_breakdown(runs)
    main_table = report.table(summary, targets)
    sys_table = report.syscall_table(breakdown, targets)
    failed = [r for r in runs if not r["ok"]]
    out = [header, ""] if header else []
    out += [main_table, "", "† a run of this median was load-bound.", SHARED_NOTE, ""]
    for run in runs:
        if run.get("profile"):
            samples = run["profile"]["samples"]
            out += [f"meshgw profile, rate-classic (py-spy, {samples} samples):", ""]
            out += ["| own % | function | | incl. % | function |", "|---|---|---|---|---|"]
            for (f1, p1), (f2, p2) in zip(
                run["profile"]["own"], run["profile"]["inclusive"], strict=False
            ):
                out.append(f"| {p1} | {f1} | | {p2} | {f2} |")
            out.append("")
    if sys_table:
        out += ["System calls per proxied connection (strace -c -f):", "", sys_table, ""]
    out += ["Goals:", "", report.goals_table(goals)]
    if notes:
        out += ["", *(f"note: {n}" for n in notes)]
    text = "\n".join(out)
    click.echo(text)
    if markdown_path:
        Path(markdown_path).write_text(text + "\n")
    if json_path:
        document = {
            "meta": meta,
            "notes": notes,
            "summary": summary,
            "goals": goals,
            "syscalls_per_conn": breakdown,
            "runs": runs,
        }
        Path(json_path).write_text(json.dumps(document, indent=1, default=str) + "\n")
    if plot_path:
        why = report.plot(summary, targets, plot_path, f"meshgw bench, {meta['date']}")
        if why:
            click.echo(f"meshgw bench: no plot: {why}", err=True)
    if failed:
        for run in failed:
            reason = run["error"] or "; ".join(run["checks"])
            click.echo(
                f"failed: {run['variant']} {run['target']} #{run['repeat']}: {reason}", err=True
            )
    if keep or failed:
        click.echo(f"meshgw bench: work folder kept: {workdir}", err=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(1 if failed else 0)
