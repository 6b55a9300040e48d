"""Percentiles (nearest rank, no interpolation: every reported value was measured)."""
import math


def percentile(ordered, q):
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_us(samples_ns):
    """n, p50, p99, p99.9, mean, max of nanosecond samples, in microseconds."""
    ordered = sorted(samples_ns)
    if not ordered:
        return {"n": 0}

    def us(v):
        return round(v / 1e3, 2)

    return {
        "n": len(ordered),
        "p50_us": us(percentile(ordered, 50)),
        "p99_us": us(percentile(ordered, 99)),
        "p999_us": us(percentile(ordered, 99.9)),
        "mean_us": us(sum(ordered) / len(ordered)),
        "max_us": us(ordered[-1]),
    }


def ratio(value, reference):
    if value is None or not reference:
        return None
    return round(value / reference, 3)
