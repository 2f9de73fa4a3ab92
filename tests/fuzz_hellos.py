"""A long fuzz campaign against the ClientHello and PROXY header readers and a real gateway.

    python -m tests.fuzz_hellos --hellos 1000000 --sockets 50000 --seed 7 --max-seconds 3600

In process, each input (see tests/fuzz_inputs.py) is fed to a reader one-shot and in random
splits, at a random cap: the reader never raises, never holds more than its cap, answers the
same for every split, a Hello re-parses the same from its own length and not from one byte
less, and a final answer stays final. Inputs with a PROXY header go through the PROXY reader
the same way, then what follows the header through the ClientHello reader.

Over sockets (tests/fuzz_sockets.py): one ``meshgw run`` child routes a few names to loopback
backends; fuzzed openings arrive from a bounded number of concurrent clients, and only hellos
of routed names may reach a backend, byte-exact; every connection ends; no traceback; the
gateway's descriptors come back to their baseline.

Exit status: 0 all passed, 1 a failure (its seed, input as hex and a replay command are
printed), 3 no failure but ``--max-seconds`` ran out before the counts were done. A failing
input replays with ``--replay HEX`` (with its ``--cap``, ``--cuts`` and ``--proxy-cap``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from random import Random

from meshgw.wire.clienthello import ClientHelloReader, Hello, Rejection, parse_client_hello
from meshgw.wire.names import normalize_host_name
from meshgw.wire.proxyproto import (
    ProxyHeader,
    ProxyHeaderReader,
    ProxyRejection,
    parse_proxy_header,
)
from tests import fuzz_inputs as F

PROGRESS_EVERY = 10.0  # seconds between progress lines
MAX_FAILURES = 10  # a campaign stops collecting after this many


# --- the properties, for one input -------------------------------------------------------------


def _pieces(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)] or [b""]


def check_client_hello(data: bytes, cuts: Sequence[int], cap: int) -> str:
    """Feed ``data`` one-shot and in ``cuts`` pieces at ``cap``; the outcome's label."""
    one_shot = parse_client_hello(data, cap)
    reader = ClientHelloReader(cap)
    result: Hello | Rejection | None = None
    for piece in _pieces(data, cuts):
        answer = reader.feed(piece)
        assert reader.buffered <= cap, f"buffered {reader.buffered} > cap {cap}"
        held = len(reader._payload) + len(reader._hdr)
        assert held <= cap, f"holds {held} bytes > cap {cap}"
        if result is not None:
            assert answer is result, "a final answer changed"
        result = answer
    assert result == one_shot, f"split answer {result!r} != one-shot {one_shot!r}"
    if isinstance(result, Hello):
        assert 0 < result.length <= min(len(data), cap) and reader.buffered == result.length
        assert parse_client_hello(data[: result.length], cap) == result, "not the same from length"
        assert parse_client_hello(data[: result.length - 1], cap) is None, "decided too late"
        assert normalize_host_name(result.sni) == result.sni, f"sni {result.sni!r} not canonical"
        return "hello"
    if isinstance(result, Rejection):
        detail = result.detail
        assert 0 < len(detail) < 200 and detail.isascii() and detail.isprintable(), detail
        return result.reason.value
    assert result is None, f"answer of type {type(result).__name__}"
    assert reader.buffered == len(data), "undecided, yet bytes were left unread"
    return "need_more"


def check_proxy(data: bytes, cuts: Sequence[int], cap: int) -> tuple[str, ProxyHeader | None]:
    """As :func:`check_client_hello`, for the PROXY header reader."""
    one_shot = parse_proxy_header(data, cap)
    reader = ProxyHeaderReader(cap)
    result: ProxyHeader | ProxyRejection | None = None
    for piece in _pieces(data, cuts):
        answer = reader.feed(piece)
        assert reader.buffered <= cap and len(reader._buf) <= cap, f"over cap {cap}"
        if result is not None:
            assert answer is result, "a final answer changed"
        result = answer
    assert result == one_shot, f"split answer {result!r} != one-shot {one_shot!r}"
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= min(len(data), cap) and reader.buffered == result.length
        assert parse_proxy_header(data[: result.length], cap) == result
        assert parse_proxy_header(data[: result.length - 1], cap) is None, "decided too late"
        return f"header_v{result.version}", result
    if isinstance(result, ProxyRejection):
        detail = result.detail
        assert 0 < len(detail) < 100 and detail.isascii() and detail.isprintable(), detail
        return result.reason.value, None
    assert result is None, f"answer of type {type(result).__name__}"
    assert reader.buffered == len(data), "undecided, yet bytes were left unread"
    return "need_more", None


@dataclass(frozen=True)
class Trial:
    """One input with everything needed to replay it exactly."""

    kind: str
    data: bytes
    cuts: list[int]
    cap: int
    proxy_cap: int | None = None  # set: the input starts with a PROXY header

    def run(self) -> list[str]:
        """The outcome labels; raises AssertionError (or whatever a reader raised)."""
        if self.proxy_cap is None:
            return ["hello/" + check_client_hello(self.data, self.cuts, self.cap)]
        label, header = check_proxy(self.data, self.cuts, self.proxy_cap)
        labels = ["proxy/" + label]
        if header is not None:
            rest = self.data[header.length :]
            shifted = [c - header.length for c in self.cuts if c > header.length]
            labels.append("hello/" + check_client_hello(rest, shifted, self.cap))
        return labels

    def replay_args(self) -> str:
        args = f"--replay {self.data.hex()} --cap {self.cap}"
        if self.cuts:
            args += " --cuts " + ",".join(map(str, self.cuts))
        if self.proxy_cap is not None:
            args += f" --proxy-cap {self.proxy_cap}"
        return args


def draw_trial(rng: Random, maker: F.InputMaker) -> Trial:
    made = maker.next()
    size = len(made.data)
    cuts = F.cuts(rng, size)
    cap = F.hello_cap(rng, size)
    proxy_cap = F.proxy_cap(rng, size) if made.proxy else None
    return Trial(made.kind, made.data, cuts, cap, proxy_cap)


# --- campaigns ----------------------------------------------------------------------------------


@dataclass
class Report:
    """What a campaign did: counts per outcome, failures with what replays them."""

    name: str
    wanted: int
    done: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.done >= self.wanted

    def summary(self) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        lines = [
            f"{self.name}: {self.done:,} of {self.wanted:,} in {self.seconds:.1f} s "
            f"({rate:,.0f}/s), {len(self.failures)} failure(s)"
        ]
        lines += [f"  {'kind ' + k:<40} {n:>10,}" for k, n in sorted(self.kinds.items())]
        lines += [f"  {'outcome ' + k:<40} {n:>10,}" for k, n in sorted(self.outcomes.items())]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


class Progress:
    """A line every ``PROGRESS_EVERY`` seconds, to ``out`` (None: quiet)."""

    def __init__(self, out: Callable[[str], None] | None, report: Report) -> None:
        self.out, self.report = out, report
        self.started = self.next_at = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if self.out is not None and now >= self.next_at:
            self.next_at = now + PROGRESS_EVERY
            done, wanted = self.report.done, self.report.wanted
            self.out(f"{self.report.name}: {done:,}/{wanted:,} after {now - self.started:.0f} s")


def run_in_process(
    count: int, seed: int, deadline: float, out: Callable[[str], None] | None = None
) -> Report:
    """``count`` inputs through both readers; stops early at ``deadline`` (monotonic)."""
    report = Report("in process", count)
    rng = Random(seed)
    maker = F.InputMaker(rng, F.seed_pool())
    progress = Progress(out, report)
    started = time.monotonic()
    for index in range(count):
        if index % 256 == 0:
            if time.monotonic() >= deadline:
                report.notes.append("stopped at --max-seconds")
                break
            progress.tick()
        trial = draw_trial(rng, maker)
        report.kinds[trial.kind] += 1
        try:
            report.outcomes.update(trial.run())
        except Exception:
            report.failures.append(_describe(seed, index, trial, traceback.format_exc()))
            if len(report.failures) >= MAX_FAILURES:
                break
        report.done += 1
    report.seconds = time.monotonic() - started
    return report


def _describe(seed: int, index: int, trial: Trial, error: str) -> str:
    return (
        f"seed {seed}, input #{index} ({trial.kind}, {len(trial.data)} bytes)\n"
        f"{error.rstrip()}\n"
        f"replay: python -m tests.fuzz_hellos {trial.replay_args()}"
    )


def replay(hex_input: str, cap: int, cuts: list[int], proxy_cap: int | None) -> int:
    trial = Trial("replay", bytes.fromhex(hex_input), cuts, cap, proxy_cap)
    try:
        labels = trial.run()
    except Exception:
        traceback.print_exc()
        return 1
    print("passed:", ", ".join(labels))
    return 0


# --- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz_hellos",
        description="Fuzz the ClientHello/PROXY readers in process and a meshgw child over "
        "sockets. Exit 0: passed; 1: a failure; 3: --max-seconds ran out first.",
    )
    parser.add_argument("--hellos", type=int, default=100_000, help="in-process inputs")
    parser.add_argument("--sockets", type=int, default=2_000, help="connections to a gateway")
    parser.add_argument("--seed", type=int, default=None, help="random seed [a fresh one]")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="time bound, all in")
    parser.add_argument("--concurrency", type=int, default=48, help="clients at once [48]")
    parser.add_argument("--replay", metavar="HEX", help="check one input and exit")
    parser.add_argument("--cap", type=int, default=65536, help="ClientHello cap for --replay")
    parser.add_argument("--cuts", default="", help="split offsets for --replay, e.g. 1,5,9")
    parser.add_argument("--proxy-cap", type=int, default=None, help="PROXY cap for --replay")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.replay:
        cuts = [int(c) for c in args.cuts.split(",") if c.strip()]
        return replay(args.replay, args.cap, cuts, args.proxy_cap)
    seed = args.seed if args.seed is not None else Random().randrange(1 << 32)
    print(f"seed {seed}", flush=True)
    deadline = time.monotonic() + args.max_seconds

    def say(line: str) -> None:
        print(line, flush=True)

    reports = [run_in_process(args.hellos, seed, deadline, say)]
    if args.sockets and not reports[0].failures:
        from tests.fuzz_sockets import run_over_sockets

        reports.append(run_over_sockets(args.sockets, seed, deadline, args.concurrency, say))
    for report in reports:
        print(report.summary())
        for failure in report.failures:
            print(f"FAILED ({report.name}): {failure}")
    if any(r.failures for r in reports):
        print(f"seed {seed}: FAILED")
        return 1
    if not all(r.complete for r in reports) or len(reports) < 1 + bool(args.sockets):
        print(f"seed {seed}: no failure, but --max-seconds ran out before the counts")
        return 3
    print(f"seed {seed}: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
