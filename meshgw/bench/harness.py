"""Running one measurement: backend, proxy under test and load generator, all on loopback.

Every process started here is pinned (proxy on its CPUs, load and backend on theirs), stopped by
its PID and waited for; every load run is bounded in count and time by the load generator itself
and, around it, by deadlines here. CPU and memory come from /proc: utime+stime and RSS summed over
the proxy's whole process tree (nginx's workers, Envoy's threads), and the whole machine's busy
time from /proc/stat (what the kernel does for the proxy outside its process too).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

from meshgw.bench import hellos, peers, scenarios
from meshgw.bench.scenarios import Variant

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
START_TIMEOUT = 20.0  # seconds for a proxy or backend to come up
STOP_TIMEOUT = 10.0  # seconds for a process to exit after SIGTERM before SIGKILL
SLACK = 30.0  # seconds a load run may take beyond its nominal duration
LISTENING = re.compile(r"meshgw listening listen=(\S+):(\d+) admin=(\S+):(\d+)")
SHARED_FRACTION = 0.05  # other processes' share of all CPUs that marks a run as shared
LOADGEN_ENV = "MESHGW_X_BENCH_LOADGEN"  # "python" forces the Python load generator


class BenchError(Exception):
    """A run could not be made (a proxy did not start, the load generator failed...)."""


# --- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 0


def _processes() -> dict[int, list[str]]:
    """The /proc/<pid>/stat fields (after the command name) of every process alive now."""
    out: dict[int, list[str]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                out[int(entry.name)] = fields
    return out


def process_tree(root: int, processes: dict[int, list[str]] | None = None) -> list[int]:
    """`root` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for pid, fields in (processes if processes is not None else _processes()).items():
        children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


_PF_KTHREAD = 0x00200000  # /proc/<pid>/stat flags: a kernel thread


def others_cpu_ticks(root: int) -> dict[int, int]:
    """{pid: utime+stime in ticks} of every user process outside `root`'s tree: other work.

    Kernel threads are left out: ksoftirqd and the kworkers may be doing the bench's work.
    """
    processes = _processes()
    mine = set(process_tree(root, processes))
    return {
        pid: int(fields[11]) + int(fields[12])
        for pid, fields in processes.items()
        if pid not in mine and not int(fields[6]) & _PF_KTHREAD
    }


def others_cpu_between(start: dict[int, int], end: dict[int, int]) -> float:
    """CPU seconds other processes used between two snapshots (those that ended are missed)."""
    return sum(ticks - start.get(pid, 0) for pid, ticks in end.items()) / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of every thread of these processes."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


@dataclass(frozen=True)
class MachineSample:
    """The whole machine's CPU counters (/proc/stat, every CPU) at one moment."""

    when: float  # time.monotonic() of the read
    cpus: int  # CPUs online, each with its own line in /proc/stat
    idle_s: float  # idle + iowait of every CPU since boot
    busy_fields_s: float  # user + nice + system + irq + softirq + steal since boot


# /proc/stat: "cpu user nice system idle iowait irq softirq steal guest guest_nice" in clock
# ticks, summed over the CPUs; guest time is already inside user and nice.
_IDLE_FIELDS = (3, 4)
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def machine_sample() -> MachineSample:
    with open("/proc/stat") as stat:
        lines = stat.read().splitlines()
    fields = [int(n) for n in lines[0].split()[1:]]
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return MachineSample(
        when=time.monotonic(),
        cpus=cpus,
        idle_s=sum(fields[i] for i in _IDLE_FIELDS) / CLK_TCK,
        busy_fields_s=sum(fields[i] for i in _BUSY_FIELDS if i < len(fields)) / CLK_TCK,
    )


def machine_busy(start: MachineSample, end: MachineSample) -> float:
    """CPU seconds the whole machine (every CPU, every process, the kernel) was not idle.

    Every CPU's time minus its idle and iowait: user, nice, system, irq, softirq and steal. It
    is counted from the idle side because a tickless kernel measures idle periods exactly but
    samples the busy kinds at its ticks, which fall in idle between the short bursts of
    request/response work: summing the busy fields missed a third of a ping-pong's CPU here.
    """
    return max(0.0, (end.when - start.when) * end.cpus - (end.idle_s - start.idle_s))


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


def parse_cpus(text: str) -> list[int]:
    """'1', '0,1', '0-3' → CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        if not low.isdigit() or not (high or low).isdigit():
            raise ValueError(f"not a CPU list: {text!r}")
        cpus.update(range(int(low), int(high or low) + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return sorted(cpus)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- child processes --------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None) if sys.platform == "linux" else None
# The bench turns these into KeyboardInterrupt (cli.py): the runs so far are reported.
_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}
_running: dict[int, Child] = {}  # pid → every child started here and not yet reaped


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT and SIGTERM stay pending while the body runs, and are handled right after.

    An interrupt raised inside Popen, after the fork but before Popen returns, would lose the
    child: never stopped, never reaped, left to die of PR_SET_PDEATHSIG once the bench is gone.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def stop_all() -> list[str]:
    """Stop and reap every child still running, newest first: what an interrupt cut short.

    Returns their command names. Interrupts wait meanwhile: each stop is bounded.
    """
    left = list(_running.values())[::-1]
    with _interrupts_held():
        for child in left:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.stop()
    return [Path(child.argv[0]).name for child in left]


def _prepare_child(cpus: list[int] | None) -> Callable[[], None]:
    def prepare() -> None:  # runs in the child between fork and exec
        # The signal mask survives exec: undo _interrupts_held, or SIGTERM would not stop it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _INTERRUPTS)
        if _libc is not None:  # never outlive the bench, even one killed with SIGKILL
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus:
            os.sched_setaffinity(0, cpus)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # each proxied connection needs two descriptors
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return prepare


class Child:
    """One process started here: pinned, logged to a file, stopped by its PID."""

    def __init__(
        self,
        argv: list[str],
        *,
        cpus: list[int] | None,
        log: Path,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = argv
        self.log = log
        with _interrupts_held(), open(log, "ab") as err:
            try:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=stdin,
                    stdout=stdout if stdout is not None else err,
                    stderr=err,
                    preexec_fn=_prepare_child(cpus),  # no threads here: preexec_fn is safe
                    env=env,
                    cwd=cwd,
                    close_fds=True,
                )
            except OSError as error:
                raise BenchError(f"cannot start {argv[0]}: {error}") from None
            self.pid = self.proc.pid
            _running[self.pid] = self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, signum: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Signal the process, wait for it; SIGKILL it and what is left of its tree on timeout."""
        if self.proc.poll() is None:
            tree = process_tree(self.pid)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in tree:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        _running.pop(self.pid, None)  # reaped: poll() or wait() collected its status
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return self.proc.returncode


class Lines:
    """Lines from a child's stdout, each wait bounded by a deadline."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.closed = False
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def next(self, deadline: float) -> str | None:
        """The next line, or None at EOF; raises TimeoutError past the deadline."""
        while True:
            if b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                return line.decode(errors="replace")
            if self.closed:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if not self.selector.select(remaining):
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                self.closed = True
                if self.buffer:
                    line, self.buffer = self.buffer, b""
                    return line.decode(errors="replace")
                return None
            self.buffer += chunk

    def close(self) -> None:
        self.selector.close()


# --- the load generator -----------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshgw-bench"


def build_loadgen() -> Path | str:
    """The compiled C load generator (built once per source version), or why it cannot be."""
    source = resources.files("meshgw.bench").joinpath("loadgen.c").read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    folder = cache_dir()
    exe = folder / f"loadgen-{digest}"
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler (cc) found"
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / f"loadgen-{digest}.c"
    src.write_bytes(source)
    # Build under a private name and rename: concurrent first runs never see half a binary.
    tmp = folder / f".loadgen-{digest}.{os.getpid()}"
    try:
        done = subprocess.run(
            [compiler, "-O2", "-o", str(tmp), str(src)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"{compiler} failed: {error}"
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        return f"{compiler} failed: {done.stderr.strip()[-400:]}"
    os.replace(tmp, exe)
    return exe


@dataclass
class LoadTool:
    """How to run the load generator: the C program, or the Python fallback."""

    argv0: list[str]
    kind: str  # "c" | "python"
    note: str = ""

    @classmethod
    def find(cls) -> LoadTool:
        if os.environ.get(LOADGEN_ENV) == "python":
            return cls.python(f"{LOADGEN_ENV}=python")
        built = build_loadgen()
        if isinstance(built, Path):
            return cls([str(built)], "c")
        return cls.python(built)

    @classmethod
    def python(cls, why: str) -> LoadTool:
        note = (
            f"Python load generator ({why}): figures are load-bound-prone, compare the "
            "CPU-normalised ones"
        )
        return cls([sys.executable, "-m", "meshgw.bench.pyload"], "python", note)


# --- the backend ------------------------------------------------------------------------------


@dataclass
class Hellos:
    """The hello files: one classic hello per route, and the ML-KEM one for `reply`."""

    files: dict[tuple[str, str], Path] = field(default_factory=dict)

    @classmethod
    def write(cls, folder: Path) -> Hellos:
        out = cls()
        for mode in peers.ROUTES:
            name = peers.server_name(mode)
            for kind, data in (("classic", hellos.python_hello(name)),):
                out.files[(mode, kind)] = cls._save(folder, mode, kind, data)
        reply = peers.server_name("reply")
        out.files[("reply", "mlkem")] = cls._save(
            folder, "reply", "mlkem", hellos.mlkem_hello(reply)
        )
        return out

    @staticmethod
    def _save(folder: Path, mode: str, kind: str, data: bytes) -> Path:
        path = folder / f"hello-{mode}-{kind}.bin"
        path.write_bytes(data)
        return path

    def size(self, mode: str, kind: str) -> int:
        return self.files[(mode, kind)].stat().st_size


class Backend:
    """`loadgen serve`: one listener per mode; its stats arrive when its stdin closes."""

    def __init__(self, tool: LoadTool, hello_files: Hellos, cpus: list[int] | None, log: Path):
        argv = [*tool.argv0, "serve"]
        for path in hello_files.files.values():
            argv += ["--hello", str(path)]
        argv += list(peers.ROUTES)
        self.child = Child(argv, cpus=cpus, log=log, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.child.proc.stdout is not None
        self.lines = Lines(self.child.proc.stdout)
        line = self._line(time.monotonic() + START_TIMEOUT)
        if line is None or not line.startswith("ports "):
            self.child.stop()
            raise BenchError(f"backend did not start: {line!r} {self.child.tail()}")
        self.ports = {k: int(v) for k, v in (p.split("=") for p in line.split()[1:])}

    def _line(self, deadline: float) -> str | None:
        try:
            return self.lines.next(deadline)
        except TimeoutError:
            return None

    @property
    def pid(self) -> int:
        return self.child.pid

    def stop(self) -> dict[str, Any]:
        """Close its stdin: it prints its counters and exits."""
        stdin = self.child.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()
        stats: dict[str, Any] = {}
        deadline = time.monotonic() + STOP_TIMEOUT
        while (line := self._line(deadline)) is not None:
            if line.startswith("stats "):
                stats = json.loads(line[6:])
                break
        self.lines.close()
        self.child.stop()
        return stats


# --- the proxy under test ---------------------------------------------------------------------


@dataclass
class Proxy:
    target: str
    port: int
    child: Child | None  # None for `direct`
    cpus: list[int] | None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def pids(self) -> list[int]:
        return process_tree(self.child.pid) if self.child else []

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def meshgw_build(workdir: Path) -> str:
    """The build (compiled with mypyc, or pure Python) the meshgw targets run: asked of the same
    command, started from the same folder, as start_proxy starts them."""
    argv = [sys.executable, "-m", "meshgw", "--version"]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=workdir, timeout=START_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    # "meshgw, version 0.1.0, compiled (mypyc)"
    _, _, build = done.stdout.strip().partition(", version ")
    _, _, build = build.partition(", ")
    return build or f"unknown (meshgw --version said {done.stdout.strip()!r})"


def meshgw_argv(ports: dict[str, int], pump: str, workers: int) -> list[str]:
    argv = [sys.executable, "-m", "meshgw", "run", "--dc", peers.DATACENTER]
    argv += ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--expose-servers"]
    for mode, node in peers.ROUTES.items():
        argv += ["--server", f"{node}=127.0.0.1:{ports[mode]}"]
    argv += ["--no-access-log", "--pump", pump, "--workers", str(workers)]
    # Default connection cap: what the open-file limit allows, as a user's meshgw would run.
    argv += ["--drain-timeout", "2"]
    return argv


def _wait_accepting(child: Child, port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"exited with status {child.proc.returncode}: {child.tail()}")
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise BenchError(f"not accepting on port {port} after {START_TIMEOUT:.0f} s: {child.tail()}")


def _wait_meshgw(child: Child, deadline: float) -> int:
    while time.monotonic() < deadline:
        found = LISTENING.search(child.log.read_text(errors="replace"))
        if found:
            return int(found.group(2))
        if not child.alive():
            raise BenchError(f"exited with status {child.proc.returncode}: {child.tail()}")
        time.sleep(0.02)
    raise BenchError(f"no 'meshgw listening' line after {START_TIMEOUT:.0f} s: {child.tail()}")


def start_proxy(
    target: str,
    backend: Backend,
    mode: str,
    *,
    peer: peers.Peer | None,
    pump: str | None,
    workdir: Path,
    cpus: list[int] | None,
    workers: int,
    log: Path,
) -> Proxy:
    """`pump` is the mode of a meshgw target, None for the others."""
    if target == peers.DIRECT:
        return Proxy(target, backend.ports[mode], None, None)
    deadline = time.monotonic() + START_TIMEOUT
    if pump is not None:
        # Started from the work folder, not from wherever the bench was run: `-m meshgw` in a
        # checkout would import its source tree instead of the meshgw installed (and perhaps
        # compiled) with the bench.
        argv = meshgw_argv(backend.ports, pump, workers)
        child = Child(argv, cpus=cpus, log=log, cwd=workdir)
        try:
            port = _wait_meshgw(child, deadline)
        except BenchError:
            child.stop()
            raise
        return Proxy(target, port, child, cpus)
    assert peer is not None
    port = free_port()
    config = peer.write_config(workdir, port, backend.ports)
    child = Child(peer.argv(config, workdir), cpus=cpus, log=log)
    try:
        _wait_accepting(child, port, deadline)
    except BenchError:
        child.stop()
        raise
    return Proxy(target, port, child, cpus)


# --- one run ----------------------------------------------------------------------------------


@dataclass
class RunPlan:
    variant: Variant
    target: str
    repeat: int
    duration: float
    syscall_connections: int = 2000


@dataclass
class BenchSettings:
    tool: LoadTool
    hellos: Hellos
    workdir: Path
    proxy_cpus: list[int] | None
    load_cpus: list[int] | None
    workers: int = 1
    pumps: dict[str, str] = field(default_factory=peers.meshgw_targets)  # meshgw target → mode
    peers: dict[str, peers.Peer] = field(default_factory=dict)
    profile: Path | None = None  # py-spy raw stacks of meshgw during rate-classic #1

    def cpu_count(self, cpus: list[int] | None) -> int:
        return len(cpus) if cpus else (os.cpu_count() or 1)


def _client_argv(settings: BenchSettings, plan: RunPlan, port: int) -> list[str]:
    v = plan.variant
    hello = settings.hellos.files[(v.backend, v.hello)]
    argv = [*settings.tool.argv0]
    common = ["--port", str(port), "--hello", str(hello)]
    if v.scenario == "rate":
        return [
            *argv,
            "rate",
            *common,
            "--concurrency",
            str(v.connections),
            "--duration",
            str(plan.duration),
        ]
    if v.scenario == "syscalls":
        return [
            *argv,
            "rate",
            *common,
            "--concurrency",
            str(v.connections),
            "--count",
            str(plan.syscall_connections),
            "--timeout",
            "120",
        ]
    if v.scenario == "bulk":
        return [
            *argv,
            "bulk",
            *common,
            "--connections",
            str(v.connections),
            "--duration",
            str(plan.duration),
            "--direction",
            v.direction,
        ]
    if v.scenario == "rr":
        return [
            *argv,
            "rr",
            *common,
            "--connections",
            str(v.connections),
            "--duration",
            str(plan.duration),
            "--size",
            "64",
        ]
    if v.scenario == "idle":
        return [
            *argv,
            "idle",
            *common,
            "--count",
            str(v.connections),
            "--concurrency",
            "128",
            "--timeout",
            "120",
        ]
    raise ValueError(v.scenario)


def _run_client(
    argv: list[str],
    settings: BenchSettings,
    log: Path,
    deadline: float,
    on_event: Callable[[str, Child], None] | None = None,
) -> dict[str, Any]:
    """Run the load generator to its result line; `on_event` sees start/end/held lines."""
    child = Child(
        argv, cpus=settings.load_cpus, log=log, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.proc.stdout is not None
    lines = Lines(child.proc.stdout)
    result: dict[str, Any] | None = None
    try:
        while True:
            try:
                line = lines.next(deadline)
            except TimeoutError:
                raise BenchError("load generator passed its deadline") from None
            if line is None:
                break
            if line.startswith("result "):
                result = json.loads(line[7:])
                break
            if on_event is not None:
                on_event(line.split()[0] if line else "", child)
    finally:
        lines.close()
        child.stop()
    if result is None:
        raise BenchError(f"load generator gave no result: {child.tail()}")
    return result


def _strace_summary(path: Path) -> dict[str, dict[str, int]]:
    """`strace -c` table → {syscall: {calls, errors}} plus 'total'."""
    out: dict[str, dict[str, int]] = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) < 5 or not re.match(r"^\d+\.\d+$", parts[0]):
            continue
        # columns: % time, seconds, usecs/call, calls, [errors], syscall
        name = parts[-1]
        numbers = parts[1:-1]
        calls = int(numbers[2])
        errors = int(numbers[3]) if len(numbers) > 3 else 0
        out[name] = {"calls": calls, "errors": errors}
    return out


@contextlib.contextmanager
def _strace(pids: list[int], folder: Path, name: str) -> Iterator[Path]:
    """Count the proxy's system calls while the body runs: attach to every process and thread."""
    strace = shutil.which("strace")
    if strace is None:
        raise BenchError("strace is not installed (apt-get install strace)")
    out = folder / f"{name}.strace"
    argv = [strace, "-c", "-f", "-o", str(out)]
    for pid in pids:
        argv += ["-p", str(pid)]
    log = folder / f"{name}.strace.log"
    child = Child(argv, cpus=None, log=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:  # one "Process N attached [with M threads]" each
            if log.read_text(errors="replace").count(" attached") >= len(pids):
                break
            if not child.alive():
                raise BenchError(f"strace failed: {child.tail()}")
            time.sleep(0.05)
        time.sleep(0.2)
        yield out
    finally:
        child.stop(signal.SIGINT)  # detaches and writes the summary


def _start_py_spy(pid: int, duration: float, out: Path | None, folder: Path) -> Child:
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None or out is None:
        raise BenchError("py-spy is not installed (pip install py-spy)")
    argv = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "250",
        "--nonblocking",
        "--format",
        "raw",
        "--duration",
        str(max(1, round(duration))),
        "--output",
        str(out),
    ]
    return Child(argv, cpus=None, log=folder / "py-spy.log")


_FRAME = re.compile(r"^(.*) \((?:.*/)?([^/:]+)(?::\d+)?\)$")


def _frame(text: str) -> str:
    """'on_readable (/x/meshgw/dataplane/pump.py:97)' → 'on_readable (pump.py)'."""
    found = _FRAME.match(text)
    return f"{found.group(1)} ({found.group(2)})" if found else text


def profile_top(path: Path, top: int = 10) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks → the top functions by own and by inclusive samples, in %."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return {}

    def best(counts: dict[str, int]) -> list[tuple[str, float]]:
        # frames in (nearly) every sample are the entry points (click, runpy, the loop): skip
        ranked = sorted(
            ((k, n) for k, n in counts.items() if n < 0.95 * total), key=lambda kv: -kv[1]
        )[:top]
        return [(name, round(100 * n / total, 1)) for name, n in ranked]

    return {"own": best(own), "inclusive": best(inclusive), "samples": total}


def run_once(plan: RunPlan, settings: BenchSettings) -> dict[str, Any]:
    """One measurement of one variant against one target, as a JSON-able record."""
    v = plan.variant
    tag = f"{v.name}-{plan.target}-{plan.repeat}"
    folder = settings.workdir
    record: dict[str, Any] = {
        "variant": v.name,
        "scenario": v.scenario,
        "target": plan.target,
        "repeat": plan.repeat,
        "load_tool": settings.tool.kind,
        "hello_bytes": settings.hellos.size(v.backend, v.hello),
        "ok": False,
        "error": None,
        "checks": [],
        "proxy": {"cpus": settings.cpu_count(settings.proxy_cpus)},
        "load": {"cpus": settings.cpu_count(settings.load_cpus)},
        "warmup": {},
    }
    backend = Backend(
        settings.tool, settings.hellos, settings.load_cpus, folder / f"{tag}.backend.log"
    )
    proxy: Proxy | None = None
    try:
        proxy = start_proxy(
            plan.target,
            backend,
            v.backend,
            peer=settings.peers.get(plan.target),
            pump=settings.pumps.get(plan.target),
            workdir=folder,
            cpus=settings.proxy_cpus,
            workers=settings.workers,
            log=folder / f"{tag}.proxy.log",
        )
        record["proxy"]["processes"] = len(proxy.pids())
        _run(plan, settings, record, backend, proxy, folder, tag)
    except BenchError as error:
        record["error"] = str(error)
    finally:
        if proxy is not None:
            proxy.stop()
        record["backend"] = backend.stop()
    if record["error"] is None:
        record["figures"] = scenarios.compute(v, record)
        record["checks"] = scenarios.checks(v, record)
        record["ok"] = not record["checks"]
    return record


def _run(
    plan: RunPlan,
    settings: BenchSettings,
    record: dict[str, Any],
    backend: Backend,
    proxy: Proxy,
    folder: Path,
    tag: str,
) -> None:
    v = plan.variant
    # Warm-up through the reply route: proves the proxy routes, and settles lazy allocations
    # before memory is measured.
    reply_port = proxy.port if proxy.child else backend.ports["reply"]
    warm_hello = settings.hellos.files[("reply", "classic")]
    warm = [
        *settings.tool.argv0,
        "rate",
        "--port",
        str(reply_port),
        "--hello",
        str(warm_hello),
        "--concurrency",
        "8",
        "--count",
        "200",
        "--timeout",
        "10",
    ]
    warmup = _run_client(warm, settings, folder / f"{tag}.warmup.log", time.monotonic() + 30)
    record["warmup"] = {k: warmup[k] for k in ("completed", "errors", "rx_total", "first_error")}
    if warmup["errors"] or warmup["completed"] != 200:
        raise BenchError(
            f"warm-up through {plan.target} failed: {warmup['errors']} errors, "
            f"{warmup['first_error'] or 'short replies'}"
        )
    time.sleep(0.2)
    pids = proxy.pids()
    if proxy.child:
        record["proxy"]["rss_before"] = rss_bytes(pids)
    samples: dict[str, tuple[float, float, float]] = {}
    machine_at: dict[str, MachineSample] = {}
    others: dict[str, dict[int, int]] = {}

    def sample(name: str) -> None:
        now = time.monotonic()
        proxy_cpu = cpu_seconds(proxy.pids()) if proxy.child else 0.0
        samples[name] = (now, proxy_cpu, cpu_seconds([backend.pid]))
        machine_at[name] = machine_sample()
        others[name] = others_cpu_ticks(os.getpid())  # last: the slowest, a /proc scan

    spy: list[Child] = []

    def on_event(event: str, client: Child) -> None:
        if event in ("start", "end"):
            sample(event)
        if event == "start" and profiling and proxy.pid is not None:
            spy.append(_start_py_spy(proxy.pid, plan.duration, settings.profile, folder))
        elif event == "held":
            time.sleep(0.3)  # let the proxy settle what the last set-ups allocated
            if proxy.child:
                record["proxy"]["rss_held"] = rss_bytes(proxy.pids())
            stdin = client.proc.stdin
            if stdin is not None:
                stdin.close()  # the client closes every connection and reports

    profiling = bool(
        settings.profile and plan.target == peers.SUBJECT and v.name == "rate-classic"
    ) and (plan.repeat == 1)
    port = proxy.port if proxy.child else backend.ports[v.backend]
    argv = _client_argv(settings, plan, port)
    limit = plan.duration + SLACK if v.scenario in ("rate", "bulk", "rr") else 150.0
    log = folder / f"{tag}.client.log"
    if v.scenario == "syscalls":
        if not proxy.child:
            raise BenchError("nothing to trace without a proxy")
        with _strace(pids, folder, tag) as out:
            client = _run_client(argv, settings, log, time.monotonic() + limit, on_event)
        record["syscalls"] = _strace_summary(out)
        if "total" not in record["syscalls"]:
            raise BenchError(
                f"strace gave no summary: {(folder / f'{tag}.strace.log').read_text()[-300:]}"
            )
    else:
        try:
            client = _run_client(argv, settings, log, time.monotonic() + limit, on_event)
        finally:
            for child in spy:  # it stops by itself after the window; wait for its file
                child.stop(signal.SIGINT, timeout=plan.duration + STOP_TIMEOUT)
    if spy and settings.profile is not None:
        record["profile"] = profile_top(settings.profile)
    record["client"] = client
    if "start" in samples and "end" in samples:
        t0, p0, b0 = samples["start"]
        t1, p1, b1 = samples["end"]
        record["proxy"]["cpu_s"] = p1 - p0 if proxy.child else None
        m0, m1 = machine_at["start"], machine_at["end"]
        record["machine"] = {
            "cpu_s": machine_busy(m0, m1),
            "cpus": m1.cpus,
            "window_s": m1.when - m0.when,
            "busy_fields_s": m1.busy_fields_s - m0.busy_fields_s,  # tick-sampled: for reference
            "others_cpu_s": others_cpu_between(others["start"], others["end"]),
        }
        record["load"]["backend_cpu_s"] = b1 - b0
        record["load"]["client_cpu_s"] = client["cpu_s"]
        record["load"]["cpu_s"] = client["cpu_s"] + (b1 - b0)
        record["load"]["sampled_window_s"] = t1 - t0
    else:
        raise BenchError("the load generator reported no measurement window")
    window = client["window_s"] or 0.0
    proxy_frac = (
        record["proxy"]["cpu_s"] / window / record["proxy"]["cpus"]
        if proxy.child and window
        else None
    )
    load_frac = record["load"]["cpu_s"] / window / record["load"]["cpus"] if window else 0.0
    # The load side, not the proxy, was the limit: its core was busy while the proxy had room.
    record["load_bound"] = bool(load_frac >= 0.9 and (proxy_frac is None or proxy_frac < 0.9))
    machine = record["machine"]
    others_frac = machine["others_cpu_s"] / window / machine["cpus"] if window else 0.0
    # Other work ran on the machine meanwhile: its CPU is in the whole machine's figures.
    record["shared"] = others_frac >= SHARED_FRACTION
