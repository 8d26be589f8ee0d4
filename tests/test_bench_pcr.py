"""The PCR bench measures the signer, not the agent's rate limit (tests/bench_pcr.py).

Created back to back, its one-at-a-time requests emptied the agent's token bucket and most of
them then waited ~50 ms for a token: section 7's p50 jumped from ~15 to ~60 ms on how fast the
loop ran. The limiter and the loop's pacing run here on a clock that moves only when one of them
sleeps, so the bucket refills only by the pacing: no wall-clock margin decides the outcome.
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path

from agent.kube.client import KubeSettings, TokenBucket
from tests.bench_pcr import REQUESTS_PER_PCR, bench_pcr, pace


class SleptClock:
    """Monotonic time that moves only by ``sleep`` (from any thread), and instantly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
            self.slept.append(seconds)


def test_one_at_a_time_requests_never_wait_for_the_rate_limit(tmp_path: Path) -> None:
    clock = SleptClock()
    # 6 tokens: 4 left after the list and the watch, two requests' worth; without the pacing
    # the third request would wait for its tokens (the clock moves only when something sleeps).
    settings = KubeSettings(qps=20, burst=6)
    results = bench_pcr(tmp_path, 6, 0, settings=settings, clock=clock, sleep=clock.sleep)
    assert len(results.sequential_event) == 6
    assert results.sequential_throttled == []
    # The pacing is what refilled the bucket: 2/qps after each answer but the last.
    assert len(clock.slept) == 5
    assert all(abs(s - REQUESTS_PER_PCR / settings.qps) < 1e-9 for s in clock.slept)
    # Measured as the agent runs: what lived before the requests frozen out of the cyclic
    # collector (a full collection over the whole bench process took ~20 ms), and thawed after.
    assert results.frozen_objects > 10_000
    assert gc.get_freeze_count() == 0


def test_the_burst_counts_the_waits_it_has(tmp_path: Path) -> None:
    clock = SleptClock()
    # 4 tokens, 2 left after the list and the watch: of a burst of 3 (6 tokens), 4 wait.
    results = bench_pcr(
        tmp_path, 0, 3, settings=KubeSettings(qps=20, burst=4), clock=clock, sleep=clock.sleep
    )
    assert results.sequential_throttled == []
    assert len(results.burst_throttled) == 4


def test_pace_waits_only_what_is_left() -> None:
    clock = SleptClock()
    answered = clock()
    clock.sleep(0.03)
    pace(answered, 0.1, clock, clock.sleep)
    assert abs(clock.slept[-1] - 0.07) < 1e-9
    pace(answered, 0.1, clock, clock.sleep)  # already 0.1 s later: no sleep
    assert len(clock.slept) == 2


def test_limiter_refilled_by_pacing_keeps_its_level() -> None:
    """The invariant pace() relies on, on the agent's TokenBucket alone."""
    clock = SleptClock()
    waits: list[float] = []
    bucket = TokenBucket(20, 4, clock=clock, sleep=waits.append)
    for _ in range(50):
        answered = clock()
        for _ in range(REQUESTS_PER_PCR):
            bucket.acquire()
        pace(answered, REQUESTS_PER_PCR / 20, clock, clock.sleep)
    assert waits == []
