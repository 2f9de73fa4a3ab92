"""This process's kernel tunnels on the event loop, and when a connection is handed to one.

A kernel tunnel (sockmap.py) moves a connection's bytes inside the kernel: no wake-up of this
process per request. Joining costs this process 110-140 us once, more than a whole short
connection costs in userspace (about 90 us); each round trip it then moves costs this process
nothing, where the userspace Flows cost it about 35 us (two wake-ups, recv and send in Python).
So the modes differ in when they join:

- sockmap: every connection, as soon as its hello is upstream. For gateways whose connections
  are known to be long-lived; a refused join (full, busy) is tried again a second later.
- auto: a connection starts in userspace/splice as always and is promoted once it has shown it
  is long-lived and busy: `AUTO.after` seconds old and `AUTO.wakeups` wake-ups spent. Short
  connections (gossip push/pull, one-off RPCs) end long before and never pay the join; a
  pooled RPC or Raft connection pays it back within a few round trips. The figures behind the
  thresholds: docs/operations.md#when-auto-promotes-and-the-figures-behind-it.

Promotion waits for a quiescent moment: a tunnel is joined only while neither Flow holds a
byte (the join's precondition); otherwise it is asked again later. Joins are spread over
rounds (`MAX_JOINS_PER_ROUND`), so a thousand pooled connections coming of age together do
not stall the loop for everyone else.

Here: the ring buffer's descriptor as a loop reader, `tick` on a timer, the promotion rounds.
The connections themselves are tunnel.py's Tunnel (userspace, until promoted) and
kerneltunnel.py's KernelTunnel (joined).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from meshgw.dataplane.deadlines import Deadlines
from meshgw.dataplane.poller import FailureHandler
from meshgw.dataplane.sockmap import KernelTunnels, sockmap_unavailable

log = logging.getLogger("meshgw.dataplane")

# Per process; beyond it joins are refused ("full") and connections stay in userspace. The BPF
# maps are allocated up front: about 7 MiB for 16384 tunnels, charged to the memory cgroup.
MAX_KERNEL_TUNNELS = 16384
# Bytes the kernel may hold per direction beyond the socket buffers, for a reader slower than
# its writer (sockmap.py, "an allowance"). They are charged to no socket buffer, so the bound
# is kept small; 1 MiB still means one ring event per 512 KiB moved.
KERNEL_CREDIT = 1 << 20
MAX_JOINS_PER_ROUND = 64  # about 10 ms of joining per round at most
SOON = 0.01  # the next round, while joins wait their turn


@dataclass(frozen=True, slots=True)
class Promotion:
    """When a connection is handed to a kernel tunnel."""

    at_start: bool  # join as soon as the hello is upstream
    after: float  # seconds in userspace before a tunnel is considered (and between retries)
    wakeups: int  # events the tunnel must have cost this process by then
    # Promote a connection that moves bulk through splice too. Splice already moves bulk
    # without copying it and 64 KiB per wake-up; a kernel tunnel forwards in userspace each
    # time the reader falls behind, which for bulk is often (docs/operations.md).
    bulk: bool


SOCKMAP = Promotion(at_start=True, after=1.0, wakeups=0, bulk=True)
AUTO = Promotion(at_start=False, after=1.0, wakeups=32, bulk=False)
POLICIES = {"sockmap": SOCKMAP, "auto": AUTO}
RETRY = frozenset({"held", "full", "busy"})  # promote() answers worth asking again


class Candidate(Protocol):
    """A userspace tunnel that may be promoted (tunnel.py's Tunnel)."""

    closed: bool
    wakeups: int

    @property
    def bulk(self) -> bool:
        """A direction moves bulk through splice, for good."""
        ...

    def promote(self, trigger: str) -> str:
        """ "joined", "held" (a Flow holds bytes: not now), "closed", or a refusal reason."""
        ...


class KernelPlane:
    """The process's KernelTunnels, driven by the loop; one per DataPlane."""

    __slots__ = (
        "_due", "_round", "_tick_at", "_timer", "failed", "loop", "policy", "tunnels", "waiting",
    )  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tunnels: KernelTunnels,
        policy: Promotion,
        failed: FailureHandler,
    ) -> None:
        self.loop = loop
        self.tunnels = tunnels
        self.policy = policy
        self.failed = failed  # a bug met promoting one connection closes only that one
        self.waiting: Deadlines = Deadlines(policy.after)  # candidates, oldest first
        self._due: deque[Candidate] = deque()  # of age, waiting for a round with room
        loop.add_reader(tunnels.fileno(), self._on_ring)
        self._timer: asyncio.Handle | None = None
        self._tick_at = 0.0  # loop time the timer is due
        self._tick()
        self._round: asyncio.TimerHandle | None = loop.call_later(self._period(), self._promote)

    # --- the kernel's requests ------------------------------------------------------------------

    def _on_ring(self) -> None:
        self.tunnels.dispatch()
        self._tick()

    def _tick(self) -> None:
        self._arm(self.tunnels.tick())

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._tick_at = self.loop.time() + delay
        self._timer = self.loop.call_later(delay, self._tick)

    def wake(self) -> None:
        """Bytes may wait for userspace to forward them (a flush found them): tick soon."""
        if self._timer is not None and self._tick_at > self.loop.time() + SOON:
            self._arm(0.0)

    # --- promotion ------------------------------------------------------------------------------

    def consider(self, candidate: Candidate) -> None:
        """Ask `candidate` to join once it has waited `policy.after` seconds."""
        self.waiting.add(candidate, time.monotonic())

    def forget(self, candidate: Candidate) -> None:
        self.waiting.discard(candidate)

    def _period(self) -> float:
        return SOON if self._due else min(max(self.policy.after / 4, 0.05), 1.0)

    def _promote(self) -> None:
        now = time.monotonic()
        due = self._due
        due.extend(self.waiting.expired(now))
        attempts = 0
        while due and attempts < MAX_JOINS_PER_ROUND:
            candidate = due.popleft()
            if candidate.closed or (candidate.bulk and not self.policy.bulk):
                continue  # closed while it waited for a round with room, or splice keeps it
            if candidate.wakeups < self.policy.wakeups:
                self.waiting.add(candidate, now)  # not busy (yet): look again later
                continue
            attempts += 1
            try:
                result = candidate.promote("promotion")
            except Exception as error:
                self.failed(candidate.promote, error)
                continue
            if result in RETRY:
                self.waiting.add(candidate, now)
        self._round = self.loop.call_later(self._period(), self._promote)

    # --- the end --------------------------------------------------------------------------------

    def close(self) -> None:
        """After every connection has closed: stop the timers, free the kernel objects."""
        for timer in (self._timer, self._round):
            if timer is not None:
                timer.cancel()
        self._timer = self._round = None
        self._due.clear()
        self.loop.remove_reader(self.tunnels.fileno())
        self.tunnels.close()


def open_kernel_plane(
    loop: asyncio.AbstractEventLoop, pump: str, max_connections: int, failed: FailureHandler
) -> tuple[KernelPlane | None, str | None]:
    """The plane `pump` asks for, or None and why not, a reason that holds for every process
    (None: the mode uses no kernel tunnel, or this process's failure was logged already)."""
    policy = POLICIES.get(pump)
    if policy is None:
        return None, None
    reason = sockmap_unavailable()
    if reason is not None:
        return None, reason
    capacity = min(max_connections, MAX_KERNEL_TUNNELS)
    try:
        tunnels = KernelTunnels(capacity, KERNEL_CREDIT)
    except OSError as error:
        # The probe passed, but maps this large were refused (memory): this process only, so
        # it says so itself (whichever worker it is), and goes on without.
        log.warning(
            "kernel tunnels off in this process: BPF maps for %d tunnels: %s; --pump %s "
            "moves bytes with splice and userspace",
            capacity,
            error.strerror or error,
            pump,
        )
        return None, None
    return KernelPlane(loop, tunnels, policy, failed), None


def pump_unavailable(pump: str) -> str | None:
    """Why `pump` cannot do here what it says (meshgw would fall back to another mode)."""
    if pump != "sockmap":
        return None
    reason = sockmap_unavailable()
    return f"kernel tunnels unavailable: {reason}" if reason else None
