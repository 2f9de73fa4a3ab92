"""`meshgw bench`: a short real run (C load generator, meshgw as a child, direct loopback), the
Python fallback, and the pure parts (hellos, strace parsing, tables, goals)."""

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

from meshgw.bench import harness, hellos, report, scenarios
from meshgw.wire.clienthello import ClientHelloReader, Hello

REPO = Path(__file__).resolve().parent.parent
SMOKE_LIMIT = 60.0  # seconds the smoke run may take, start-up to report


def bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "meshgw", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=SMOKE_LIMIT,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "meshgw/direct" in done.stdout  # the ratio table
    assert "[" in done.stderr and "/" in done.stderr  # the progress lines
    return json.loads(out.read_text())


def by(document: dict[str, Any], variant: str, target: str) -> dict[str, Any]:
    [run] = [r for r in document["runs"] if r["variant"] == variant and r["target"] == target]
    return run


def close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * max(abs(a), abs(b))


@pytest.mark.skipif(harness.shutil.which("cc") is None, reason="needs a C compiler")
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


def test_sigterm_stops_every_child_and_reports(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshgw", "bench", "--scenarios", "rr-1", "--against", "direct",
         "--duration", "60", "--repeat", "1", "--json", str(tmp_path / "bench.json")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MESHGW_BENCH_LOADGEN": "python"},
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


def _entry(value: float, bound: int = 0) -> dict[str, Any]:
    return {"median": value, "min": value * 0.9, "max": value * 1.1, "n": 3, "load_bound": bound}


def test_table_ratios_and_goals() -> None:
    summary = {
        "rate-classic": {
            "meshgw": {"conn_s": _entry(9000), "cpu_us_per_conn": _entry(110)},
            "haproxy": {"conn_s": _entry(12000), "cpu_us_per_conn": _entry(100)},
            "envoy": {"conn_s": _entry(5000, bound=1), "cpu_us_per_conn": _entry(200)},
        },
        "idle": {"meshgw": {"kib_per_conn": _entry(2.0)}},
    }
    text = report.table(summary, ["meshgw", "direct", "haproxy", "envoy"])
    assert "| meshgw/haproxy |" in text
    assert "| 0.75 |" in text  # 9000 / 12000 conn/s
    assert "†" in text  # envoy's load-bound median is marked
    goals = {g["goal"]: g for g in report.evaluate_goals(summary)}
    cpu = goals["proxy CPU per connection ≤ 1.25x HAProxy's"]
    assert cpu["status"] == "met" and cpu["ratio"] == pytest.approx(1.1)
    rate = goals["conn/s ≥ 1.5x Envoy's"]  # envoy was load-bound: compared per CPU second
    assert rate["status"] == "met" and rate["ratio"] == pytest.approx(200 / 110)
    assert "CPU-normalised" in rate["basis"]
    assert goals["≤ 2.5 KiB per idle connection"]["status"] == "met"
    assert goals["rr c=1 p99 ≤ the best peer's"]["status"] == "n/a"
