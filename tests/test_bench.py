"""`meshgw bench`: short real runs (C load generator, meshgw as a child in its pump modes, direct
loopback), the Python fallback, stopping on SIGTERM, the command line, and the pure parts
(hellos, /proc accounting, strace parsing, peer lookup, tables, goals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from meshgw import __version__, dataplane
from meshgw.bench import cli, harness, hellos, peers, report, scenarios
from meshgw.buildinfo import build
from meshgw.wire.clienthello import ClientHelloReader, Hello

SMOKE_LIMIT = 180.0  # seconds the smoke run may take, start-up to report, on a busy machine
needs_cc = pytest.mark.skipif(harness.shutil.which("cc") is None, reason="needs a C compiler")


def bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`meshgw bench ARGS --json`, run from a folder that is not the source tree."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "meshgw", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=SMOKE_LIMIT,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"meshgw {__version__}, {build()}, Python ")  # the header
    assert "meshgw/direct" in done.stdout  # the ratio table
    assert "machine CPU" in done.stdout  # the whole machine's figures, next to the proxy's
    assert "[" in done.stderr and "/" in done.stderr  # the progress lines
    return json.loads(out.read_text())


def by(document: dict[str, Any], variant: str, target: str) -> dict[str, Any]:
    [run] = [r for r in document["runs"] if r["variant"] == variant and r["target"] == target]
    return run


def close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * max(abs(a), abs(b))


@pytest.mark.slow
@needs_cc
def test_quick_run_counts_the_proxy_and_the_whole_machine(tmp_path: Path) -> None:
    doc = bench(
        tmp_path,
        "--scenarios",
        "rate-classic,rr-1",
        "--duration",
        "0.3",
        "--repeat",
        "1",
        "--against",
        "direct,meshgw-userspace",
    )
    assert doc["meta"]["pump_modes"] == {"meshgw": "auto", "meshgw-userspace": "userspace"}
    # The build measured is the one these tests import, wherever the bench was started from.
    assert doc["meta"]["build"] == build()
    tick = 1 / harness.CLK_TCK
    for run in doc["runs"]:
        assert run["ok"], (run["variant"], run["target"], run["error"], run["checks"])
        machine, figures, client = run["machine"], run["figures"], run["client"]
        assert machine["cpus"] == os.cpu_count()
        # The whole machine's busy time holds the proxy's, the load generator's and the
        # backend's (each counted in clock ticks, over nearly the same window).
        own = (run["proxy"]["cpu_s"] or 0.0) + run["load"]["cpu_s"]
        assert machine["cpu_s"] >= 0.9 * own - 4 * tick, (machine, own)
        per = "machine_cpu_us_per_conn" if run["scenario"] == "rate" else "machine_cpu_us_per_req"
        assert close(figures[per], machine["cpu_s"] * 1e6 / client["completed_window"], 1e-6)
        assert close(machine["window_s"], client["window_s"], 0.5)
        share = machine["cpu_s"] / machine["window_s"] / machine["cpus"]
        assert close(figures["machine_cpu_pct"], 100 * share, 1e-6) and share <= 1
        others = machine["others_cpu_s"] / client["window_s"] / machine["cpus"]
        assert figures["others_cpu_pct"] >= 0
        assert run["shared"] == (others >= harness.SHARED_FRACTION)
        if run["target"] == "direct":  # no proxy, but the machine is counted all the same
            assert run["proxy"].get("cpu_s") is None and "cpu_us_per_conn" not in figures
    goals = {g["goal"] for g in doc["goals"]}
    assert {g.text for g in report.GOALS} == goals
    assert any("machine CPU" in g for g in goals)


@needs_cc
@pytest.mark.slow
def test_smoke_run_adds_up(tmp_path: Path) -> None:
    doc = bench(
        tmp_path,
        "--scenarios",
        "rate,bulk,rr",
        "--duration",
        "0.5",
        "--repeat",
        "1",
        "--against",
        "direct",
    )
    assert doc["meta"]["load_tool"] == "c"
    variants = [v.name for v in scenarios.VARIANTS if v.scenario in ("rate", "bulk", "rr")]
    assert len(doc["runs"]) == 2 * len(variants)
    for run in doc["runs"]:
        # Every run verified its bytes: hellos verbatim, payload echoed/sunk/replied intact.
        assert run["ok"], (run["variant"], run["target"], run["error"], run["checks"])
        client, figures = run["client"], run["figures"]
        assert client["errors"] == client["corrupt"] == 0
        # The harness's own clock agrees with the load generator's window (it samples /proc
        # when told the window opened and closed, so a busy machine delays it a little).
        assert close(run["load"]["sampled_window_s"], client["window_s"], 0.5)
        assert 0.4 < client["window_s"] < 1.5
        assert all(v >= 0 for v in figures.values())
    for target in ("meshgw", "direct"):
        for variant in ("rate-classic", "rate-mlkem"):
            run = by(doc, variant, target)
            client, figures, side = run["client"], run["figures"], run["backend"]["reply"]
            assert figures["conn_s"] > 100
            # conn/s x the measured window = connections made in the window
            assert close(figures["conn_s"] * client["window_s"], client["completed_window"], 0.01)
            # every connection's hello reached the backend verbatim; every reply came back
            assert side["hello_ok"] == client["completed"] + run["warmup"]["completed"]
            assert side["hello_bad"] == 0
            assert side["bytes_out"] == client["rx_total"] + run["warmup"]["rx_total"]
            assert figures["lat_p50_ms"] <= figures["lat_p99_ms"]
        for variant in ("bulk-up-1", "bulk-up-64"):
            run = by(doc, variant, target)
            client, sink = run["client"], run["backend"]["sink"]
            assert sink["bytes_in"] == client["tx_total"] > 0  # bytes in = bytes out
            assert sink["corrupt"] == 0
            moved = run["figures"]["gbit_s"] * 1e9 / 8 * client["window_s"]
            assert close(moved, client["tx_window"], 0.01)
        for variant in ("bulk-both-1", "bulk-both-64", "rr-1", "rr-64"):
            run = by(doc, variant, target)
            client, echo = run["client"], run["backend"]["echo"]
            assert echo["bytes_in"] == echo["bytes_out"] == client["tx_total"] == client["rx_total"]
            assert client["tx_total"] > 0
        for variant in ("rr-1", "rr-64"):
            f = by(doc, variant, target)["figures"]
            assert f["req_s"] > 100
            assert f["p50_us"] <= f["p90_us"] <= f["p99_us"] <= f["p999_us"]
    for variant in variants:
        run = by(doc, variant, "meshgw")
        cpu = run["proxy"]["cpu_s"]
        assert cpu > 0
        assert run["proxy"]["processes"] >= 1
        figures, client = run["figures"], run["client"]
        if "cpu_us_per_conn" in figures:
            assert close(figures["cpu_us_per_conn"], cpu * 1e6 / client["completed_window"], 1e-6)
        if "cpu_s_per_gb" in figures:
            moved = (client["tx_window"] + client["rx_window"]) / 1e9
            assert close(figures["cpu_s_per_gb"], cpu / moved, 1e-6)
        assert "proxy_cpu_pct" in figures
    assert by(doc, "rate-classic", "direct")["proxy"].get("cpu_s") is None
    # medians exist for both targets, and the goals were evaluated
    assert doc["summary"]["rate-classic"]["meshgw"]["conn_s"]["n"] == 1
    assert {g["goal"] for g in doc["goals"]} == {g.text for g in report.GOALS}


@pytest.mark.slow
def test_sigterm_stops_every_child_and_reports(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshgw", "bench", "--scenarios", "rr-1", "--against", "direct",
         "--duration", "60", "--repeat", "1", "--json", str(tmp_path / "bench.json")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MESHGW_X_BENCH_LOADGEN": "python"},
    )  # fmt: skip
    try:
        # No event says when the load runs: the load generator's process appearing is the sign
        # (backend and proxy start before it). Polled closely, so the signal often lands while
        # the bench is still starting that process, where a child was once lost.
        deadline = time.monotonic() + SMOKE_LIMIT
        while True:
            tree = harness.process_tree(proc.pid)
            if any(b"\0rr\0" in _cmdline(pid) for pid in tree):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "bench did not start"
            time.sleep(0.002)
        children = [pid for pid in tree if pid != proc.pid]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=SMOKE_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted" in err
    assert (tmp_path / "bench.json").exists()
    assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []


def test_an_interrupt_while_a_child_starts_cannot_lose_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM landing while Popen waits for the exec, as the bench's interrupt may."""
    prepare = harness._prepare_child

    def interrupting(cpus: list[int] | None) -> Any:
        inner = prepare(cpus)

        def run_in_child() -> None:
            os.kill(os.getppid(), signal.SIGTERM)
            inner()

        return run_in_child

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "_prepare_child", interrupting)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            harness.Child(["sleep", "30"], cpus=None, log=tmp_path / "sleep.log")
    finally:
        signal.signal(signal.SIGTERM, previous)
    [pid] = [pid for pid, child in harness._running.items() if child.argv[0] == "sleep"]
    assert harness.stop_all() == ["sleep"]
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped
    assert harness._running == {}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
def test_python_fallback_load_generator(tmp_path: Path) -> None:
    doc = bench(
        tmp_path,
        "--scenarios",
        "rate-classic,rr-1",
        "--duration",
        "0.3",
        "--repeat",
        "1",
        "--against",
        "direct",
        env={harness.LOADGEN_ENV: "python"},
    )
    assert doc["meta"]["load_tool"] == "python"
    assert any("load-bound-prone" in note for note in doc["notes"])
    for run in doc["runs"]:
        assert run["ok"], (run["variant"], run["target"], run["error"], run["checks"])
        assert run["load_tool"] == "python"


def test_hellos_are_real_and_routable() -> None:
    name = "n1.server.dc1.consul"
    classic, mlkem = hellos.python_hello(name), hellos.mlkem_hello(name)
    assert 480 <= len(classic) <= 600
    assert len(mlkem) == hellos.MLKEM_HELLO_SIZE
    assert hellos.mlkem_hello(name) == mlkem  # deterministic across runs
    for data in (classic, mlkem):
        result = ClientHelloReader().feed(data)
        assert isinstance(result, Hello)
        assert result.sni == name
        assert result.length == len(data)


ECHO = """
import sys, time
for line in sys.stdin.buffer:
    sys.stdout.buffer.write(b"%r\\n" % time.process_time() if line == b"t\\n" else line)
    sys.stdout.buffer.flush()
"""


def test_whole_machine_cpu_counts_short_bursts() -> None:
    """A ping-pong with a child: bursts far shorter than a clock tick, as in the rr scenario."""
    child = subprocess.Popen(
        [sys.executable, "-c", ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    stdin, stdout = child.stdin, child.stdout
    assert stdin is not None and stdout is not None

    def ask(line: bytes) -> bytes:
        stdin.write(line)
        stdin.flush()
        return stdout.readline()

    try:
        its0, mine0, start = float(ask(b"t\n")), time.process_time(), harness.machine_sample()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # bounded in time
            assert ask(b"ping\n") == b"ping\n"
        end, mine1, its1 = harness.machine_sample(), time.process_time(), float(ask(b"t\n"))
    finally:
        child.kill()
        child.wait()
    both = (mine1 - mine0) + (its1 - its0)  # exact: the scheduler's own runtime of each
    busy = harness.machine_busy(start, end)
    assert busy >= 0.9 * both, (busy, both, end.busy_fields_s - start.busy_fields_s)
    assert busy <= (end.when - start.when) * end.cpus
    assert start.cpus == end.cpus == os.cpu_count()


def test_other_processes_are_those_outside_the_bench() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        others = harness.others_cpu_ticks(os.getpid())
        mine = set(harness.process_tree(os.getpid()))
        assert {os.getpid(), child.pid} <= mine and not mine & set(others)
        assert os.getppid() in others  # whoever started the tests is other work
        kthreadd = Path("/proc/2/stat")
        if kthreadd.exists() and "(kthreadd)" in kthreadd.read_text():
            assert 2 not in others  # kernel threads may be doing the bench's work
    finally:
        child.kill()
        child.wait()
    start = {1: 100, 2: 50}
    end = {1: 130, 3: 20}  # 2 ended (its time is missed), 3 started
    assert harness.others_cpu_between(start, end) == pytest.approx(50 / harness.CLK_TCK)


def test_peer_configurations_ship_with_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = peers.default_config_dir()
    assert "bench/peers" in str(folder).replace("\\", "/")
    assert Path(str(folder)).parent == Path(peers.__file__).parent  # inside meshgw.bench
    for name in peers.PEERS:
        assert "{{listen_port}}" in folder.joinpath(peers.CONFIG_FILES[name]).read_text()
    # From any folder, with no peer on PATH: skipped as not installed, never as unconfigured.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(peers, "_envoy_binary", lambda: None)
    for name in peers.PEERS:
        reason = peers.find_peer(name, peers.default_config_dir())
        assert reason == f"{name} is not installed ({peers.INSTALL_HINTS[name]})"
    missing = peers.find_peer("haproxy", tmp_path)
    assert isinstance(missing, str) and missing.startswith("no configuration")


def test_meshgw_targets_are_the_data_planes_pump_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert peers.meshgw_targets() == {
        "meshgw": "auto",
        "meshgw-splice": "splice",
        "meshgw-userspace": "userspace",
        "meshgw-sockmap": "sockmap",
    }
    # A mode the data plane adds is a target, with nothing else to change.
    monkeypatch.setattr(dataplane, "PUMP_MODES", (*dataplane.PUMP_MODES, "newmode"))
    assert peers.meshgw_targets()["meshgw-newmode"] == "newmode"
    assert "meshgw-newmode" in peers.targets()
    notes: list[str] = []
    targets, found = cli._choose_targets("direct,meshgw-newmode", peers.default_config_dir(), notes)
    assert targets == ["meshgw", "direct", "meshgw-newmode"] and found == {} and notes == []
    argv = harness.meshgw_argv({mode: 1 for mode in peers.ROUTES}, "newmode", 1)
    assert argv[argv.index("--pump") + 1] == "newmode"
    assert not peers.is_peer("meshgw-newmode") and not peers.is_peer("direct")


def test_a_mode_the_kernel_refuses_is_skipped_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """meshgw would fall back and measure another mode under the sockmap label."""
    from meshgw.dataplane import kernelplane

    monkeypatch.setattr(kernelplane, "sockmap_unavailable", lambda: "bpf() refused: EPERM")
    notes: list[str] = []
    targets, _ = cli._choose_targets("meshgw-sockmap,direct", peers.default_config_dir(), notes)
    assert targets == ["meshgw", "direct"]
    assert notes == ["meshgw-sockmap skipped: kernel tunnels unavailable: bpf() refused: EPERM"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--against", "direct,nope"], "unknown nope"),
        (["--scenarios", "nope"], "unknown scenario nope"),
        (["--duration", "0"], "must be in (0, 600]"),
        (["--repeat", "0"], "--repeat"),
        (["--proxy-cpus", "x"], "--proxy-cpus: not a CPU list: 'x'"),
    ],
)
def test_usage_errors_exit_2_before_anything_runs(args: list[str], says: str) -> None:
    result = CliRunner().invoke(cli.bench_command, args)
    assert result.exit_code == 2, result.output
    assert says in result.stderr
    assert "[  1/" not in result.stderr and "note:" not in result.stderr  # no run, no set-up


def test_plot_without_matplotlib_exits_2_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    result = CliRunner().invoke(cli.bench_command, ["--plot", str(tmp_path / "out.png")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "meshgw bench: --plot needs matplotlib: pip install 'meshgw[bench]'"
    ]
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_strace_summary_parsing(tmp_path: Path) -> None:
    sample = tmp_path / "s.strace"
    sample.write_text(
        "% time     seconds  usecs/call     calls    errors syscall\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        " 40.00    0.004000           2      2000      1000 recvfrom\n"
        " 10.00    0.001000           1      1000           accept4\n"
        "------ ----------- ----------- --------- --------- ----------------\n"
        "100.00    0.010000           3      3000      1000 total\n"
    )
    parsed = harness._strace_summary(sample)
    assert parsed["recvfrom"] == {"calls": 2000, "errors": 1000}
    assert parsed["accept4"] == {"calls": 1000, "errors": 0}
    assert parsed["total"]["calls"] == 3000


def test_scenario_selection() -> None:
    chosen = scenarios.select(["rr", "rate-mlkem", "idle"], 123)
    assert [v.name for v in chosen] == ["rate-mlkem", "rr-1", "rr-64", "idle"]
    assert chosen[-1].connections == 123
    with pytest.raises(ValueError, match="unknown scenario"):
        scenarios.select(["nope"], 10)
    assert harness.parse_cpus("0-2,5") == [0, 1, 2, 5]


def _entry(value: float, bound: int = 0, shared: int = 0) -> dict[str, Any]:
    return {
        "median": value,
        "min": value * 0.9,
        "max": value * 1.1,
        "n": 3,
        "load_bound": bound,
        "shared": shared,
    }


def test_table_ratios_and_goals() -> None:
    summary = {
        "rate-classic": {
            "meshgw": {
                "conn_s": _entry(9000),
                "cpu_us_per_conn": _entry(110),
                "machine_cpu_us_per_conn": _entry(150),
            },
            "meshgw-userspace": {"conn_s": _entry(8000), "cpu_us_per_conn": _entry(120)},
            "direct": {"conn_s": _entry(16000, bound=1), "machine_cpu_us_per_conn": _entry(60)},
            "haproxy": {
                "conn_s": _entry(12000),
                "cpu_us_per_conn": _entry(100),
                "machine_cpu_us_per_conn": _entry(130, shared=1),
            },
            "envoy": {"conn_s": _entry(5000, bound=1), "cpu_us_per_conn": _entry(200)},
        },
        "idle": {"meshgw": {"kib_per_conn": _entry(2.0)}},
    }
    order = [*peers.meshgw_targets(), "direct", "haproxy", "envoy"]
    text = report.table(summary, order)
    assert "| meshgw/haproxy |" in text and "| meshgw/meshgw-userspace |" in text
    assert "| 0.75 |" in text  # 9000 / 12000 conn/s
    assert "†" in text  # envoy's load-bound median is marked
    assert "130.0 (117.0-143.0) ‡ | 1.15 |" in text  # machine CPU, shared machine, 150 / 130
    goals = {g["goal"]: g for g in report.evaluate_goals(summary)}
    cpu = goals["proxy CPU per connection ≤ 1.25x HAProxy's"]
    assert cpu["status"] == "met" and cpu["ratio"] == pytest.approx(1.1)
    assert cpu["peer"] == "haproxy"  # meshgw-userspace and direct are not peers
    # The whole machine, with what direct costs (the load side alone) taken off both sides.
    machine = goals["machine CPU per connection, beyond direct's, ≤ 1.25x HAProxy's"]
    assert machine["status"] == "missed" and machine["ratio"] == pytest.approx(90 / 70)
    assert "direct's 60 taken off" in machine["basis"] and "‡" in machine["basis"]
    rate = goals["conn/s ≥ 1.5x Envoy's"]  # envoy was load-bound: compared per CPU second
    assert rate["status"] == "met" and rate["ratio"] == pytest.approx(200 / 110)
    assert "CPU-normalised" in rate["basis"]
    assert goals["≤ 2.5 KiB per idle connection"]["status"] == "met"
    assert goals["rr c=1 p99 ≤ the best peer's"]["status"] == "n/a"
    del summary["rate-classic"]["direct"]
    machine = next(g for g in report.evaluate_goals(summary) if g["goal"].startswith("machine CPU"))
    assert machine["status"] == "n/a" and "no direct figure" in machine["detail"]
