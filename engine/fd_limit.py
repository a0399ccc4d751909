"""Enough file descriptors for every connection the engine accepts.

Each terminal connection is one descriptor; so are the database connections,
the listening sockets and the log files. Many systems start processes with a
soft limit of 1,024, which would refuse terminals long before
MAX_CONNECTIONS. At start the engine raises its soft limit towards the hard
one, and if the system will not allow enough, it lowers its own connection
limit to what the descriptors can carry, and says so.
"""

from __future__ import annotations

import logging
import resource

from engine.limits import MAX_CONNECTIONS

log = logging.getLogger("citycard.fd_limit")

# Descriptors the engine needs besides terminal connections: the database
# (writer, pool, probe), listening and metrics sockets, the event loop's own,
# logs, and headroom for a dying connection's socket still being closed.
RESERVED_DESCRIPTORS = 64


def ensure_descriptors(max_connections: int = MAX_CONNECTIONS) -> int:
    """Raise RLIMIT_NOFILE for ``max_connections``; return the connections it allows.

    >>> ensure_descriptors(10) >= 10
    True
    """
    wanted = max_connections + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("cannot raise the file descriptor limit", extra={"soft": soft, "error": str(error)})
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return max_connections
    allowed = max(0, soft - RESERVED_DESCRIPTORS)
    log.warning(
        "file descriptor limit caps the connections",
        extra={"descriptors": soft, "connections": allowed, "configured": max_connections},
    )
    return allowed
