"""One timing and memory harness for every suite and benchmark.

GPU work is timed with CUDA events around each call (after warm-up); CPU work with `perf_counter`.
Every measurement reports the median with p20/p80 and min/max over the measured repetitions, so
tables show the spread, not one lucky number.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements (milliseconds, bytes, or any unit the caller says)."""

    p50: float
    p20: float
    p80: float
    min: float
    max: float
    n: int
    mean: float = float("nan")  # every value counts (a median hides rare slow steps, e.g. predictor refreshes)

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        if not values:
            raise ValueError("Stats.of needs at least one value")
        v = sorted(values)
        q = lambda p: v[min(len(v) - 1, max(0, round(p * (len(v) - 1))))]  # noqa: E731
        return cls(
            p50=statistics.median(v), p20=q(0.2), p80=q(0.8), min=v[0], max=v[-1], n=len(v), mean=statistics.fmean(v)
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class Timer:
    """Times regions on one device; `region()` nests no timers and synchronizes nothing on its own.

    On CUDA each region records a pair of events; `elapsed_ms()` synchronizes once at the end, so
    the timed code is never stalled by the timer. On CPU the regions are host wall-clock.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._spans: list[tuple[str, object, object]] = []

    @contextmanager
    def region(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._spans.append((name, start, end))

    def elapsed_ms(self) -> dict[str, float]:
        """Sum of each region's time since the last call, in ms; resets the timer."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        out: dict[str, float] = {}
        for name, start, end in self._spans:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3  # type: ignore[union-attr,operator]
            out[name] = out.get(name, 0.0) + ms
        self._spans.clear()
        return out


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, reps: int = 10) -> Stats:
    """Median-of-`reps` time of `fn()` in ms after `warmup` untimed calls."""
    timer = Timer(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    values = []
    for _ in range(reps):
        with timer.region("fn"):
            fn()
        values.append(timer.elapsed_ms()["fn"])
    return Stats.of(values)


_SLEEP_CYCLES = 60_000_000  # ~30-40 ms on an H100: long enough for the host to queue a batch of calls


def gpu_time_ms(fn: Callable[[], object], n: int = 10, repeats: int = 5) -> tuple[float, bool]:
    """GPU time per call of `fn` with the host's launch gaps removed (CUDA only).

    A GPU sleep holds the stream while the host queues `n` calls, then CUDA events time the `n` calls back
    to back; median over `repeats`. Returns (ms, host_bound): host_bound says the host needed longer than
    the sleep to queue them, so gaps are back in. Eager timings of small ops measure the host; this does not.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("gpu_time_ms needs a CUDA device")
    fn()
    torch.cuda.synchronize()
    s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s0.record()
    torch.cuda._sleep(_SLEEP_CYCLES)
    s1.record()
    s1.synchronize()
    sleep_ms = s0.elapsed_time(s1)
    times, host_bound = [], False
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(_SLEEP_CYCLES)
        t0 = time.perf_counter()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        host_bound |= (time.perf_counter() - t0) * 1e3 > 0.9 * sleep_ms
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return sorted(times)[len(times) // 2], host_bound


def cuda_kernels(fn: Callable[[], object], calls: int = 5, warmup: int = 3) -> list[tuple[str, float, float]]:
    """Every CUDA kernel a call of `fn` runs, as (name, launches per call, microseconds per call), longest first:
    torch.profiler over `calls` calls after `warmup` (autotuning included). Which kernels (and fills, copies) a call
    launches besides its matmuls, and what cuBLAS picked (its kernel names carry tile and cluster shape)."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        raise RuntimeError("cuda_kernels needs a CUDA device")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.count / calls, e.device_time_total / calls) for e in prof.key_averages()
               if e.device_time_total > 0]
    return sorted(kernels, key=lambda kernel: -kernel[2])


def time_phases(step: Callable[[Timer], None], device: torch.device | str, warmup: int, reps: int) -> dict[str, Stats]:
    """Run `step(timer)` (which marks its own named regions) warmup + reps times; per-region stats.

    A region missing from some repetitions is an error: phases must be the same every step.
    """
    timer = Timer(device)
    for _ in range(warmup):
        step(timer)
        timer.elapsed_ms()
    per_phase: dict[str, list[float]] = {}
    for _ in range(reps):
        step(timer)
        for name, ms in timer.elapsed_ms().items():
            per_phase.setdefault(name, []).append(ms)
    lengths = {name: len(v) for name, v in per_phase.items()}
    if len(set(lengths.values())) > 1:
        raise RuntimeError(f"phases were not timed in every step: {lengths}")
    return {name: Stats.of(v) for name, v in per_phase.items()}


@contextmanager
def autotuner_held_to(tuner, configs: list) -> Iterator[None]:
    """A Triton autotuner restricted to `configs` (its cache cleared on entry and on exit, its own space restored):
    a kernel timed at chosen configs rather than at its autotuner's pick."""
    saved = tuner.configs
    tuner.configs = list(configs)
    tuner.cache.clear()
    try:
        yield
    finally:
        tuner.configs = saved
        tuner.cache.clear()


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device | str) -> float | None:
    """Peak allocated GPU memory since the last reset, in GiB; None on a CPU (not measured)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error on any device (these become `OOM` cells, not crashes)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
