"""Medians and spreads of the runs, the ratio table, the goals, the JSON document and the chart."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from meshgw.bench.peers import DIRECT, SUBJECT, is_peer
from meshgw.bench.scenarios import EXTRA_VARIANTS, FIGURES, VARIANTS, Figure

_VARIANT_ORDER = [v.name for v in (*VARIANTS, *EXTRA_VARIANTS)]


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{variant: {target: {figure: {median, min, max, n, load_bound, shared}}}} of the good runs.

    `load_bound` and `shared` count the runs that were load-bound, or shared the machine with
    other work.
    """
    values: dict[tuple[str, str, str], list[float]] = {}
    bound: dict[tuple[str, str], int] = {}
    shared: dict[tuple[str, str], int] = {}
    for run in runs:
        if not run.get("ok"):
            continue
        key = (run["variant"], run["target"])
        bound[key] = bound.get(key, 0) + bool(run.get("load_bound"))
        shared[key] = shared.get(key, 0) + bool(run.get("shared"))
        for name, value in run.get("figures", {}).items():
            values.setdefault((*key, name), []).append(float(value))
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for (variant, target, name), vals in values.items():
        out.setdefault(variant, {}).setdefault(target, {})[name] = {
            "median": statistics.median(vals),
            "min": min(vals),
            "max": max(vals),
            "n": len(vals),
            "load_bound": bound.get((variant, target), 0),
            "shared": shared.get((variant, target), 0),
        }
    return out


def syscall_breakdown(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{target: {syscall: calls per connection (median over repeats)}} of the syscalls runs."""
    per: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        if run.get("variant") != "syscalls" or not run.get("ok") or "syscalls" not in run:
            continue
        done = run["client"]["completed"]
        for name, counts in run["syscalls"].items():
            per.setdefault(run["target"], {}).setdefault(name, []).append(counts["calls"] / done)
    return {
        target: {name: statistics.median(vals) for name, vals in names.items()}
        for target, names in per.items()
    }


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _cell(entry: dict[str, Any] | None, figure: Figure) -> str:
    if entry is None:
        return "-"
    text = _fmt(entry["median"], figure.digits)
    if entry["n"] > 1:
        text += f" ({_fmt(entry['min'], figure.digits)}-{_fmt(entry['max'], figure.digits)})"
    if entry["load_bound"]:
        text += " †"
    if entry.get("shared"):
        text += " ‡"
    return text


def targets_in(summary: dict[str, Any], order: list[str]) -> list[str]:
    seen = {t for per in summary.values() for t in per}
    return [t for t in order if t in seen]


def table(summary: dict[str, Any], order: list[str]) -> str:
    """Markdown: each figure's median (min-max) per target and meshgw's ratio to each."""
    targets = targets_in(summary, order)
    others = [t for t in targets if t != SUBJECT]
    head = ["scenario", "figure", SUBJECT]
    for other in others:
        head += [other, f"{SUBJECT}/{other}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in sorted(summary, key=_variant_key):
        scenario = variant.split("-")[0]
        for figure in FIGURES.get(scenario, ()):
            row = summary[variant]
            if not any(figure.key in row.get(t, {}) for t in targets):
                continue
            arrow = "↑" if figure.higher_is_better else "↓"
            unit = f" ({figure.unit})" if figure.unit and figure.unit != figure.label else ""
            cells = [variant, f"{figure.label}{unit} {arrow}"]
            mine = row.get(SUBJECT, {}).get(figure.key)
            cells.append(_cell(mine, figure))
            for other in others:
                theirs = row.get(other, {}).get(figure.key)
                cells.append(_cell(theirs, figure))
                ratio = (
                    mine["median"] / theirs["median"]
                    if mine and theirs and theirs["median"]
                    else None
                )
                cells.append(_fmt(ratio, 2))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def syscall_table(breakdown: dict[str, dict[str, float]], order: list[str], top: int = 40) -> str:
    targets = [t for t in order if t in breakdown]
    if not targets:
        return ""
    lead = breakdown.get(SUBJECT) or breakdown[targets[0]]
    names = sorted(
        {n for t in targets for n in breakdown[t] if n != "total"},
        key=lambda n: (-lead.get(n, 0.0), n),
    )
    lines = ["| syscall | " + " | ".join(targets) + " |", "|" + "---|" * (len(targets) + 1)]
    for name in [*names[:top], "total"]:
        cells = [_fmt(breakdown[t].get(name), 2) if name in breakdown[t] else "-" for t in targets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _variant_key(name: str) -> int:
    return _VARIANT_ORDER.index(name) if name in _VARIANT_ORDER else len(_VARIANT_ORDER)


# --- goals ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    text: str
    variant: str
    figure: str
    against: str | None  # a peer, "best" (best peer), or None: an absolute bound
    bound: float
    at_most: bool  # meshgw (or meshgw/peer) must be ≤ bound, else ≥
    normalised: str | None = None  # CPU figure to compare instead when a run was load-bound
    # A target whose figure is taken off both sides first: `direct`'s machine CPU is what the
    # load generator and backend cost without a proxy, so what is left is the proxy's whole cost.
    baseline: str | None = None


BEYOND_DIRECT = "beyond direct's"
GOALS = (
    Goal(
        "proxy CPU per connection ≤ 1.25x HAProxy's",
        "rate-classic",
        "cpu_us_per_conn",
        "haproxy",
        1.25,
        True,
    ),
    Goal(
        f"machine CPU per connection, {BEYOND_DIRECT}, ≤ 1.25x HAProxy's",
        "rate-classic",
        "machine_cpu_us_per_conn",
        "haproxy",
        1.25,
        True,
        baseline=DIRECT,
    ),
    Goal(
        "conn/s ≥ 1.5x Envoy's",
        "rate-classic",
        "conn_s",
        "envoy",
        1.5,
        False,
        normalised="cpu_us_per_conn",
    ),
    Goal("≤ 22 syscalls per proxied connection", "syscalls", "syscalls_per_conn", None, 22, True),
    Goal(
        "bulk at the loopback limit (≥ 0.9x the best peer's Gbit/s, 1 stream)",
        "bulk-up-1",
        "gbit_s",
        "best",
        0.9,
        False,
        normalised="cpu_s_per_gb",
    ),
    Goal(
        "bulk proxy CPU per GB ≤ 0.75x HAProxy's",
        "bulk-up-1",
        "cpu_s_per_gb",
        "haproxy",
        0.75,
        True,
    ),
    Goal(
        f"bulk machine CPU per GB, {BEYOND_DIRECT}, ≤ 0.75x HAProxy's",
        "bulk-up-1",
        "machine_cpu_s_per_gb",
        "haproxy",
        0.75,
        True,
        baseline=DIRECT,
    ),
    Goal(
        "rr c=64 req/s ≥ 1.1x the best peer's",
        "rr-64",
        "req_s",
        "best",
        1.1,
        False,
        normalised="cpu_us_per_req",
    ),
    Goal(
        "rr c=64 machine CPU per request ≤ 0.8x the best peer's",
        "rr-64",
        "machine_cpu_us_per_req",
        "best",
        0.8,
        True,
    ),
    Goal("rr c=1 p99 ≤ the best peer's", "rr-1", "p99_us", "best", 1.0, True),
    Goal("≤ 2.5 KiB per idle connection", "idle", "kib_per_conn", None, 2.5, True),
)


def _higher_is_better(variant: str, figure: str) -> bool:
    for f in FIGURES.get(variant.split("-")[0], ()):
        if f.key == figure:
            return f.higher_is_better
    return True


def evaluate_goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal's status (met, missed, n/a) and what was measured, from one run's medians."""
    out = []
    for goal in GOALS:
        row = summary.get(goal.variant, {})
        mine = row.get(SUBJECT, {}).get(goal.figure)
        entry: dict[str, Any] = {"goal": goal.text, "status": "n/a", "detail": ""}
        out.append(entry)
        if mine is None:
            entry["detail"] = f"no meshgw figure for {goal.variant}"
        elif goal.against is None:
            value = mine["median"]
            met = value <= goal.bound if goal.at_most else value >= goal.bound
            entry.update(
                status="met" if met else "missed",
                value=value,
                detail=f"meshgw {value:.2f} (bound {goal.bound:g})",
            )
        else:
            _compare(goal, row, entry)
    return out


def _compare(goal: Goal, row: dict[str, dict[str, dict[str, Any]]], entry: dict[str, Any]) -> None:
    """meshgw's ratio to the named or the best peer, in the same run."""
    rivals = [t for t in row if is_peer(t) and goal.figure in row[t]]
    if goal.against != "best":
        rivals = [p for p in rivals if p == goal.against]
    if not rivals:
        entry["detail"] = f"no {goal.against} figure for {goal.variant}"
        return
    base = 0.0
    if goal.baseline is not None:
        if goal.figure not in row.get(goal.baseline, {}):
            entry["detail"] = f"no {goal.baseline} figure for {goal.variant} to take off"
            return
        base = row[goal.baseline][goal.figure]["median"]
    figure, basis = goal.figure, "raw"
    involved = [row[t][goal.figure] for t in [SUBJECT, *rivals]]
    if goal.baseline is not None:
        involved.append(row[goal.baseline][goal.figure])
        basis = f"{goal.baseline}'s {base:.3g} taken off both"
    if (
        any(cell["load_bound"] for cell in involved[: 1 + len(rivals)])
        and goal.normalised
        and all(goal.normalised in row[t] for t in [SUBJECT, *rivals])
    ):
        figure, basis = goal.normalised, "CPU-normalised (a run was load-bound)"
    higher = _higher_is_better(goal.variant, figure)
    best = (max if higher else min)(rivals, key=lambda p: row[p][figure]["median"])
    a, b = row[SUBJECT][figure]["median"] - base, row[best][figure]["median"] - base
    shown = figure
    if figure != goal.figure:
        # per-unit CPU (lower is better) stands in for a rate: compare its inverse
        a, b = 1 / a, 1 / b
        shown = f"1/{figure} (work per CPU second)"
    if any(cell.get("shared") for cell in involved):
        basis += "; ‡ other work shared the machine"
    if a <= 0 or b <= 0:  # below the baseline: noise larger than the proxy's cost
        entry["detail"] = f"meshgw {a:.3g}, {best} {b:.3g} on {shown} ({basis}): no ratio"
        return
    ratio = a / b
    met = ratio <= goal.bound if goal.at_most else ratio >= goal.bound
    entry.update(
        status="met" if met else "missed",
        ratio=ratio,
        peer=best,
        basis=basis,
        detail=f"meshgw/{best} = {ratio:.2f} on {shown} (goal {'≤' if goal.at_most else '≥'}"
        f" {goal.bound:g}; {basis})",
    )


def goals_table(goals: list[dict[str, Any]]) -> str:
    lines = ["| goal | status | measured |", "|---|---|---|"]
    for g in goals:
        lines.append(f"| {g['goal']} | {g['status']} | {g['detail']} |")
    return "\n".join(lines)


# --- chart ------------------------------------------------------------------------------------

PLOTTED = (
    ("rate-classic", "conn_s"),
    ("rate-classic", "cpu_us_per_conn"),
    ("rate-classic", "machine_cpu_us_per_conn"),
    ("rate-mlkem", "conn_s"),
    ("bulk-up-1", "gbit_s"),
    ("bulk-up-1", "cpu_s_per_gb"),
    ("bulk-up-1", "machine_cpu_s_per_gb"),
    ("bulk-both-64", "gbit_s"),
    ("rr-64", "req_s"),
    ("rr-64", "machine_cpu_us_per_req"),
    ("rr-1", "p99_us"),
    ("idle", "kib_per_conn"),
    ("syscalls", "syscalls_per_conn"),
)


def plot(summary: dict[str, Any], order: list[str], path: str, title: str) -> str | None:
    """Draw the main figures as bars with min-max whiskers; None, or why nothing was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install 'meshgw[bench]' (or matplotlib)"
    panels = [(v, f) for v, f in PLOTTED if v in summary]
    if not panels:
        return "nothing to plot"
    targets = targets_in(summary, order)
    colours = {t: f"C{i}" for i, t in enumerate(targets)}
    columns = min(5, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.2 * rows), squeeze=False)
    for ax, (variant, key) in zip(axes.flat, panels, strict=False):
        figure = next(f for f in FIGURES[variant.split("-")[0]] if f.key == key)
        names, mids, lows, highs = [], [], [], []
        for t in targets:
            entry = summary[variant].get(t, {}).get(key)
            if entry is None:
                continue
            names.append(
                t + (" †" if entry["load_bound"] else "") + (" ‡" if entry["shared"] else "")
            )
            mids.append(entry["median"])
            lows.append(entry["median"] - entry["min"])
            highs.append(entry["max"] - entry["median"])
        bars = ax.bar(
            range(len(names)),
            mids,
            yerr=[lows, highs],
            capsize=3,
            color=[colours[n.split()[0]] for n in names],
        )
        for bar, name in zip(bars, names, strict=True):
            if name.split()[0] == SUBJECT:
                bar.set_edgecolor("black")
                bar.set_linewidth(1.5)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        arrow = "higher" if figure.higher_is_better else "lower"
        ax.set_title(f"{variant}\n{figure.label} ({arrow} is better)", fontsize=9)
        if figure.unit:
            ax.set_ylabel(figure.unit, fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- progress ---------------------------------------------------------------------------------


class Progress:
    """One line per run on stderr: what runs now, then its main figure or its error."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.count = 0
        self.began = time.monotonic()

    def start(self, variant: str, target: str, repeat: int) -> None:
        self.count += 1
        elapsed = time.monotonic() - self.began
        self.stream.write(
            f"[{self.count:>3}/{self.total} {elapsed:5.0f}s] {variant:<13} {target:<9} #{repeat} … "
        )
        self.stream.flush()

    def done(self, run: dict[str, Any]) -> None:
        if run.get("error"):
            self.stream.write(f"error: {run['error']}\n")
        else:
            scenario = run["scenario"]
            parts = []
            for figure in FIGURES.get(scenario, ())[:2]:
                value = run.get("figures", {}).get(figure.key)
                if value is not None:
                    parts.append(f"{_fmt(value, figure.digits)} {figure.unit or figure.label}")
            proxy = run["figures"].get("proxy_cpu_pct")
            load = run["figures"].get("load_cpu_pct")
            machine = run["figures"].get("machine_cpu_pct")
            if proxy is not None:
                parts.append(f"proxy {proxy:.0f}%")
            if load is not None:
                parts.append(f"load {load:.0f}%")
            if machine is not None:
                parts.append(f"machine {machine:.0f}%")
            others = run["figures"].get("others_cpu_pct")
            if others is not None and run.get("shared"):
                parts.append(f"others {others:.0f}%")
            if run.get("load_bound"):
                parts.append("load-bound")
            if run.get("checks"):
                parts.append("CHECK FAILED: " + "; ".join(run["checks"]))
            self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
