"""Accounting for pages pinned by zero-copy sends (docs/kernel-facts.md, fact 16)."""
import os
import resource


def zc_charge(n):
    """What a SEND_ZC of n bytes pins against RLIMIT_MEMLOCK: (n >> 12) + 2 pages."""
    return ((n >> 12) + 2) << 12


def max_zc_chunk(budget):
    """The largest chunk whose charge fits the budget (at least one page)."""
    return max(4096, ((budget >> 12) - 2) << 12)


def default_zc_budget():
    """Pinned pages count against RLIMIT_MEMLOCK unless the process may lock memory (root): stay
    well under the limit (the ring's own pages count as well) so a send does not fail ENOMEM."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() == 0 or soft == resource.RLIM_INFINITY:
        return 16 << 20
    return max(16 << 10, min(16 << 20, soft // 4))
