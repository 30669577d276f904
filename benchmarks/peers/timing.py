"""What the PyTorch peers share: the timing loop, the same statistic as benchmarks/common.hpp's
median_seconds_per_call (one untimed call, then calls for at least min_seconds and at least
min_calls calls; the median)."""
import statistics
import time


def median_seconds_per_call(fn, min_seconds, min_calls=3):
    fn()
    times = []
    while sum(times) < min_seconds or len(times) < min_calls:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
