"""Follow a blocking endpoint by Consul's rules (docs/consul.md#blocking-queries).

The index comes from X-Consul-Index, is reset when it goes backwards and never sent below 1; a
token-bucket rate limit paces the loop; errors back off exponentially with full jitter; and an
answer is yielded only when the index moved.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from meshgw.control.consul.client import ConsulClient, Params, Response
from meshgw.control.consul.errors import ConsulRequestError
from meshgw.durations import parse_duration


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket for a watch loop: Consul asks clients to rate-limit blocking loops, burst 2
    (docs/consul.md#blocking-queries)."""

    rate: float = 1.0  # requests per second, sustained; math.inf disables the limit
    burst: int = 2


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: the n-th consecutive failure waits a random time in
    [0, min(cap, base * 2**(n-1))] — so many gateways losing Consul at once do not retry in step."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(max(failures - 1, 0), 62))
        return (rng or random).uniform(0.0, ceiling)


class TokenBucket:
    def __init__(self, limit: RateLimit) -> None:
        if limit.rate <= 0 or limit.burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self._limit = limit
        self._tokens = float(limit.burst)
        self._last = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed = max(0.0, now - self._last)
        self._tokens = min(float(self._limit.burst), self._tokens + elapsed * self._limit.rate)
        self._last = now

    async def acquire(self) -> None:
        if math.isinf(self._limit.rate):
            return
        self._refill()
        if self._tokens < 1.0:
            # Time is the only thing to wait for here.
            await asyncio.sleep((1.0 - self._tokens) / self._limit.rate)
            self._refill()
        self._tokens = max(0.0, self._tokens - 1.0)


ErrorCallback = Callable[[ConsulRequestError, int, float], None]


class BlockingQuery:
    """Follow one blocking endpoint; iterate to get a `Response` each time its index moves.

    Errors never end the iteration: each failed request calls `on_error(exc, failures,
    retry_in)` (failures counts consecutive failures, so `failures == 1` marks the change from
    working to failing), then the loop backs off and retries; the first success after failures
    calls `on_recover(failures)`. `last` is the last good answer. Cancel the iterating task to
    stop.

    The index rules (docs/consul.md#blocking-queries):
    - the first request has no index: it answers at once;
    - then the index is the answer's X-Consul-Index; the next request blocks until it moves;
    - an answer whose index is lower than the one sent means the index went backwards (snapshot
      restore, a new cluster): reset to 0, then
    - "always send an index of at least 1": an index that ends below 1 (after a reset, or a
      buggy 0 from Consul) is sent as 1, which answers at once whenever the data exists, and never
      degenerates into a busy loop of non-blocking requests;
    - an answer with the index already seen is a spurious wake-up (a timeout or a change
      elsewhere) and is not yielded.
    """

    def __init__(
        self,
        client: ConsulClient,
        path: str,
        *,
        params: Params | None = None,
        dc: str | None = None,
        wait: str | float = "5m",
        rate_limit: RateLimit = RateLimit(),
        backoff: Backoff = Backoff(),
        on_error: ErrorCallback | None = None,
        on_recover: Callable[[int], None] | None = None,
    ) -> None:
        self.client = client
        self.path = path
        self.params = dict(params or {})
        self.dc = dc
        self.wait = parse_duration(wait)
        self.backoff = backoff
        self.on_error = on_error
        self.on_recover = on_recover
        self._bucket = TokenBucket(rate_limit)
        self.last: Response | None = None
        self.failures = 0
        self.index = 0  # the index the next request sends (0: none)

    def __aiter__(self) -> AsyncIterator[Response]:
        return self._run()

    async def _run(self) -> AsyncIterator[Response]:
        while True:
            await self._bucket.acquire()
            try:
                answer = await self.client.get(
                    self.path,
                    params=self.params,
                    index=self.index or None,
                    wait=self.wait if self.index else None,
                    dc=self.dc,
                )
            except ConsulRequestError as exc:
                self.failures += 1
                delay = self.backoff.delay(self.failures)
                if self.on_error is not None:
                    self.on_error(exc, self.failures, delay)
                await asyncio.sleep(delay)
                continue
            if self.failures:
                failures, self.failures = self.failures, 0
                if self.on_recover is not None:
                    self.on_recover(failures)
            sent = self.index
            changed = self.last is None or answer.index != self.last.index
            self.index = 0 if answer.index < sent else answer.index  # backwards: reset
            self.index = max(self.index, 1)  # never send an index below 1
            if changed:
                self.last = answer
                yield answer
