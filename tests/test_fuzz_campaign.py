"""The hello fuzz campaign (tests/fuzz_hellos.py) on a short budget, a longer one marked slow,
and the campaign's own reporting: a failure names its seed and replays from its hex."""

from __future__ import annotations

import os
import random
import re
import shlex
import time

import pytest

from meshgw.wire.clienthello import Hello, RejectReason
from meshgw.wire.proxyproto import ProxyRejectReason
from tests import fuzz_hellos
from tests.fuzz_hellos import Report, main, run_in_process
from tests.fuzz_sockets import run_over_sockets

SEED = 20261129  # the default suite replays the same inputs every run


def _passed(report: Report) -> None:
    assert report.failures == [], "\n\n".join(report.failures[:5])
    assert report.complete, report.summary()


def test_short_campaign_in_process() -> None:
    report = run_in_process(20_000, SEED, time.monotonic() + 120)
    _passed(report)
    # The mix reaches every answer of the ClientHello reader and the common PROXY ones.
    wanted = {f"hello/{reason.value}" for reason in RejectReason}
    wanted |= {"hello/hello", "hello/need_more", "proxy/header_v1", "proxy/header_v2"}
    wanted |= {f"proxy/{reason.value}" for reason in ProxyRejectReason}
    assert wanted <= set(report.outcomes), report.summary()


def test_short_campaign_over_sockets() -> None:
    report = run_over_sockets(300, SEED, time.monotonic() + 120)
    _passed(report)
    assert report.outcomes["routed"] >= 30 and report.outcomes["unknown_sni"] >= 30
    assert report.outcomes["hello_timeout"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_longer_campaign() -> None:
    """A fresh seed each run (or MESHGW_FUZZ_SEED): over time this covers far more inputs."""
    seed = int(os.environ.get("MESHGW_FUZZ_SEED") or random.randrange(1 << 32))
    deadline = time.monotonic() + 240
    in_process = run_in_process(200_000, seed, deadline)
    assert in_process.failures == [], f"seed {seed}:\n" + "\n\n".join(in_process.failures[:5])
    sockets = run_over_sockets(3_000, seed, deadline)
    assert sockets.failures == [], f"seed {seed}:\n" + "\n\n".join(sockets.failures[:5])
    assert in_process.complete and sockets.complete, f"seed {seed}: ran out of time"


def test_a_failure_names_its_seed_and_replays(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = fuzz_hellos.parse_client_hello

    def blind(data: bytes, max_bytes: int) -> object:  # a one-shot parse that misses hellos
        result = real(data, max_bytes)
        return None if isinstance(result, Hello) else result

    monkeypatch.setattr(fuzz_hellos, "parse_client_hello", blind)
    assert main(["--hellos", "500", "--sockets", "0", "--seed", "5"]) == 1
    out = capsys.readouterr().out
    assert "seed 5: FAILED" in out and "split answer Hello(" in out
    found = re.search(r"replay: python -m tests\.fuzz_hellos (.+)", out)
    assert found is not None, out
    replay = shlex.split(found.group(1))
    assert main(replay) == 1  # still blind: the same input fails again
    monkeypatch.undo()
    assert main(replay) == 0
    assert re.search(r"^passed: .*hello/hello", capsys.readouterr().out, re.M)


def test_running_out_of_time_is_not_a_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hellos", "1000", "--sockets", "0", "--seed", "1", "--max-seconds", "0"]) == 3
    assert "ran out before the counts" in capsys.readouterr().out
