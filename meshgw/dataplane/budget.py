"""How one process shares its open-file limit: connections, splice pipes, everything else.

A proxied connection holds two descriptors (client and upstream). A direction moving a bulk
burst through splice(2) holds a pipe, two more, for as long as bytes are in flight. Everything
else (the admin port's connections, the Consul client, logs, the epoll and listening sockets)
comes out of a fixed reserve. As HAProxy does with `maxconn` and `maxpipes`, the pipes are
budgeted next to the connections, a quarter as many: a connection that finds no pipe moves its
burst through userspace instead, so a short descriptor costs CPU, never a stalled byte.
"""

from __future__ import annotations

import errno
import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("meshgw.dataplane")

# Descriptors kept for everything that is not a proxied connection, a pipe or a connection to
# the Consul agent (the admin port's 32, logs, the epoll and listening sockets, the resolver's
# threads).
RESERVED_FDS = 128
MAX_AUTO_CONNECTIONS = 65536  # per process, when the open-file limit would allow more
MIN_AUTO_CONNECTIONS = 64
# Directions splicing at once per process; beyond it bursts go through userspace. Each pipe
# moves about 10 Gbit/s, so this is no limit on throughput, only on descriptors.
MAX_PIPES = 512
# What a system call that needs a descriptor (or socket memory) fails with when this process or
# the machine is short of them: the process's condition, never a peer's fault.
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def pipes_for(connections: int) -> int:
    return min(connections // 4, MAX_PIPES)


def descriptors_for(connections: int, others: int = 0) -> int:
    """Descriptors `connections` need with their pipes, the reserve, and `others` (the
    connections to the Consul agent)."""
    return 2 * connections + 2 * pipes_for(connections) + RESERVED_FDS + others


@dataclass(frozen=True, slots=True)
class DescriptorBudget:
    connections: int  # open connections per process; beyond it new ones are reset
    pipes: int  # splice pipes per process; beyond it bursts go through userspace

    @classmethod
    def for_limit(cls, requested: int | None, others: int = 0) -> DescriptorBudget:
        """The budget under the open-file limit, with the limit raised to fit it; `others`
        are descriptors kept for the connections to the Consul agent.

        Asked for a number of connections, the soft limit is raised towards what they and
        their pipes need (a warning if the hard limit is lower). By default (None) the soft
        limit goes up to the hard one and the connections are what fits, at most
        MAX_AUTO_CONNECTIONS: the way HAProxy derives maxconn from `ulimit -n`.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = descriptors_for(requested or MAX_AUTO_CONNECTIONS, others)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft < target:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as error:
                log.warning(
                    "cannot raise the open-file limit from %d to %d: %s", soft, target, error
                )
        if requested is None:
            connections = max(MIN_AUTO_CONNECTIONS, _fitting(soft - others))
            return cls(connections, pipes_for(connections))
        if soft < wanted:
            log.warning(
                "open-file limit %d is below the %d that --max-connections %d needs; raise "
                "`ulimit -n` or lower --max-connections",
                soft,
                wanted,
                requested,
            )
        return cls(requested, pipes_for(requested))


def _fitting(limit: int) -> int:
    """The most connections whose descriptors, pipes included, fit under `limit`."""
    free = limit - RESERVED_FDS
    connections = free * 2 // 5  # 2 per connection and 2 per pipe, a pipe per 4 connections
    if connections // 4 > MAX_PIPES:
        connections = (free - 2 * MAX_PIPES) // 2
    return min(connections, MAX_AUTO_CONNECTIONS)
