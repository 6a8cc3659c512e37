"""How many files the server may open, and how many connections each port may keep.

Every connection is one file descriptor, and the gRPC port, the HTTP port, the model files
and the logs all draw on the same per-process limit (RLIMIT_NOFILE). Many systems start
services with a soft limit of 1024 (systemd; Docker 25 and later) under a much higher hard
limit: 2,000 idle connections to either port then used up every descriptor, and the whole
process stopped accepting on both ports and logged an error per attempt. So at start-up the
soft limit is raised to the hard one (as Go's runtime does), and each port gets a cap that
leaves room for the other port and for the server's own files.
"""

from __future__ import annotations

import resource

# The server's own descriptors: 14 to 23 measured per process (LiteRT or TensorFlow, one
# worker or two), plus the health and metrics ports, model loads and TLS files.
RESERVED_FDS = 256
# An idle connection costs ~14 KiB (gRPC) or ~6 KiB (HTTP) of memory (2,000 measured):
# 10,000 on each port is ~200 MiB, beside a worker's 150-740 MiB.
MAX_AUTO_CONNECTIONS = 10_000
PORTS = 2  # gRPC and HTTP


def open_files_limit() -> int:
    """The soft limit on open files: what this process may open now."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):  # not allowed here: keep the soft limit
        return soft, soft
    return soft, hard


def connection_cap(requested: int, limit: int) -> int:
    """The connections each port may keep: `requested`, or (0) the most that fits `limit`.

    Raises ValueError when the requested cap does not fit the limit.
    """
    fits = (limit - RESERVED_FDS) // PORTS
    if requested == 0:
        return max(1, min(MAX_AUTO_CONNECTIONS, fits))
    if requested > fits:
        raise ValueError(
            f"--max-connections {requested}: the gRPC and HTTP ports together need "
            f"{PORTS * requested + RESERVED_FDS} open files, and this process may open "
            f"{limit} (ulimit -n); lower it, or raise the limit"
        )
    return requested
