"""Process memory readings for the benchmarks (Linux /proc)."""

from __future__ import annotations


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    """Resident memory now, MiB."""
    return _status("VmRSS")


def peak_rss_mib() -> float:
    """This process's resident high-water mark, MiB.

    Unlike ``ru_maxrss``, VmHWM belongs to the current address space, so a spawned child does not
    inherit the peak of the parent it was forked from.
    """
    return _status("VmHWM")
