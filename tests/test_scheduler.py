"""The renewal scheduler: due times, backoff, one heap for all volumes, no work while idle."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.volumes.scheduler import (
    MAX_SPREAD_SECONDS,
    SPREAD_FRACTION,
    RenewalScheduler,
    backoff_delay,
    plan_renewal,
    renewal_due,
)

WAIT = 5.0  # generous bound for things that must happen (never reached when they do)
DAY = 86400.0


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self._now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@pytest.fixture
def schedulers() -> Iterator[list[RenewalScheduler]]:
    made: list[RenewalScheduler] = []
    yield made
    for scheduler in made:
        scheduler.stop(timeout=2)


# --------------------------------------------------------------------------- renewal_due

lifetimes = st.floats(min_value=0, max_value=10 * 365 * DAY, allow_nan=False)


@settings(deadline=None)  # shared 2-core machine: no per-example time limit
@given(
    not_before=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    lifetime=lifetimes,
    renew_fraction=st.one_of(st.none(), st.floats(min_value=0, max_value=1.5)),
    seed=st.integers(),
)
def test_renewal_due_is_in_the_renew_window_never_before_not_before(
    not_before: float, lifetime: float, renew_fraction: float | None, seed: int
) -> None:
    not_after = not_before + lifetime
    renew_before = None if renew_fraction is None else int(lifetime * renew_fraction)
    due = renewal_due(not_before, not_after, renew_before, random.Random(seed))

    # renew-before not shorter than the lifetime gives way to the default (2/3 of the lifetime).
    fits = renew_before is not None and renew_before < lifetime
    effective = renew_before if fits else lifetime / 3
    latest = not_after - effective
    spread = min(lifetime * SPREAD_FRACTION, MAX_SPREAD_SECONDS)
    assert not_before <= due <= not_after
    assert due <= max(not_before, latest) + 1e-6
    assert due >= min(latest, not_after) - spread - 1e-6 or due == not_before


@settings(deadline=None)
@given(seed=st.integers())
def test_renewal_due_defaults_to_a_third_of_the_lifetime(seed: int) -> None:
    # 90 days: renew 30 days before expiry, at most an hour earlier.
    due = renewal_due(0.0, 90 * DAY, None, random.Random(seed))
    assert 60 * DAY - 3600 <= due <= 60 * DAY


def test_renewal_due_spreads_pods_started_together() -> None:
    rng = random.Random(7)
    dues = [renewal_due(0.0, 3600.0, None, rng) for _ in range(50)]
    assert len(set(dues)) == 50
    assert max(dues) - min(dues) > 60  # spread over minutes (5 % of an hour = 180 s)
    assert all(2400 - 180 <= due <= 2400 for due in dues)


def test_renewal_due_rejects_negative_renew_before() -> None:
    with pytest.raises(ValueError, match="renew-before"):
        renewal_due(0.0, 100.0, -1, random.Random(0))


# --------------------------------------------------------------------------- backoff_delay


@settings(deadline=None)
@given(seed=st.integers())
def test_backoff_grows_exponentially_up_to_the_cap(seed: int) -> None:
    rng = random.Random(seed)
    delays = [backoff_delay(attempt, rng) for attempt in range(1, 9)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(300.0, 2.0 * 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert delays == sorted(delays)  # equal jitter: never shorter than the previous retry
    assert 150.0 <= backoff_delay(10_000, rng) <= 300.0  # no overflow, capped (minutes)


def test_backoff_is_jittered() -> None:
    rng = random.Random(1)
    assert len({backoff_delay(5, rng) for _ in range(20)}) == 20


def test_backoff_counts_attempts_from_one() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, random.Random(0))


# --------------------------------------------------------------------------- scheduler


def test_renews_each_volume_at_its_due_time_in_real_time(
    schedulers: list[RenewalScheduler],
) -> None:
    ran: list[tuple[str, float]] = []
    done = threading.Event()

    def renew(volume_id: str) -> float | None:
        ran.append((volume_id, time.time()))
        if len(ran) == 3:
            done.set()
        return None

    # One worker: with two, a late thread could hand out two due volumes that then race.
    scheduler = RenewalScheduler(renew, workers=1)
    schedulers.append(scheduler)
    scheduler.start()
    now = time.time()
    dues = {"b": now + 0.10, "a": now + 0.05, "c": now + 0.15}
    for volume_id, due in dues.items():
        scheduler.schedule(volume_id, due)
    assert scheduler.pending() == 3
    assert scheduler.due_time("a") == dues["a"]

    assert done.wait(WAIT)
    assert [volume_id for volume_id, _ in ran] == ["a", "b", "c"]
    for volume_id, at in ran:
        assert at >= dues[volume_id]  # never early
    assert scheduler.pending() == 0  # renew returned None: forgotten
    assert scheduler.due_time("a") is None


def test_returned_due_time_is_scheduled_and_replacing_moves_a_volume(
    schedulers: list[RenewalScheduler],
) -> None:
    clock = FakeClock()
    calls: list[str] = []
    called = threading.Event()

    def renew(volume_id: str) -> float | None:
        calls.append(volume_id)
        called.set()
        return clock() + 1000

    scheduler = RenewalScheduler(renew, clock=clock)
    schedulers.append(scheduler)
    scheduler.start()
    scheduler.schedule("v", clock() + 50)
    scheduler.schedule("v", clock() + 10)  # replaces: the entry at +50 is stale
    assert scheduler.pending() == 1
    assert scheduler.due_time("v") == clock() + 10

    clock.advance(9)
    scheduler.wake()
    assert not called.wait(0.2)
    clock.advance(1)
    scheduler.wake()
    assert called.wait(WAIT)
    wait_until(lambda: scheduler.due_time("v") is not None)
    assert scheduler.due_time("v") == clock() + 1000

    clock.advance(100)  # past the stale +50 entry: it must not run again
    scheduler.wake()
    assert not _wait_for_calls(calls, 2, 0.2)
    assert calls == ["v"]


def _wait_for_calls(calls: list[str], count: int, timeout: float) -> bool:
    try:
        wait_until(lambda: len(calls) >= count, timeout)
    except AssertionError:
        return False
    return True


def test_failing_renewal_backs_off_with_growing_delays_and_success_resets(
    schedulers: list[RenewalScheduler],
) -> None:
    clock = FakeClock()
    outcomes = iter([False, False, False, True, False, True])
    retries: list[tuple[str, int, float]] = []
    successes = threading.Event()
    success_count = 0
    scheduler: RenewalScheduler

    def renew(volume_id: str) -> float | None:
        nonlocal success_count
        if not next(outcomes):
            raise RuntimeError("issuer unavailable")
        success_count += 1
        if success_count == 2:
            successes.set()
            return None
        return clock()  # due again at once: the next run fails afresh

    def on_retry(volume_id: str, attempt: int, delay: float) -> None:
        retries.append((volume_id, attempt, delay))
        # Not yet due: the retry waits for the backoff delay to pass on the clock.
        assert scheduler.due_time(volume_id) == pytest.approx(clock() + delay)
        clock.advance(delay)
        scheduler.wake()

    scheduler = RenewalScheduler(renew, clock=clock, rng=random.Random(3), on_retry=on_retry)
    schedulers.append(scheduler)
    scheduler.start()
    scheduler.schedule("v", clock())
    assert successes.wait(WAIT)

    assert [(v, attempt) for v, attempt, _ in retries] == [("v", 1), ("v", 2), ("v", 3), ("v", 1)]
    delays = [delay for _, _, delay in retries]
    assert delays[0] < delays[1] < delays[2]  # 1-2 s, 2-4 s, 4-8 s
    assert 1.0 <= delays[0] <= 2.0 and 4.0 <= delays[2] <= 8.0
    assert 1.0 <= delays[3] <= 2.0  # the success in between reset the count


def test_a_broken_on_retry_callback_does_not_stop_retries(
    schedulers: list[RenewalScheduler],
) -> None:
    clock = FakeClock()
    calls: list[str] = []

    def renew(volume_id: str) -> float | None:
        calls.append(volume_id)
        raise RuntimeError("down")

    def on_retry(volume_id: str, attempt: int, delay: float) -> None:
        clock.advance(delay)
        scheduler.wake()
        raise ValueError("callback bug")

    scheduler = RenewalScheduler(renew, clock=clock, on_retry=on_retry)
    schedulers.append(scheduler)
    scheduler.start()
    scheduler.schedule("v", clock())
    wait_until(lambda: len(calls) >= 3)


def test_cancel_during_a_run_lets_it_finish_but_drops_its_result(
    schedulers: list[RenewalScheduler],
) -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def renew(volume_id: str) -> float | None:
        calls.append(volume_id)
        started.set()
        assert release.wait(WAIT)
        return time.time()  # would be due again at once

    scheduler = RenewalScheduler(renew)
    schedulers.append(scheduler)
    scheduler.start()
    scheduler.schedule("v", time.time())
    assert started.wait(WAIT)
    scheduler.cancel("v")
    release.set()
    wait_until(lambda: scheduler.running() == 0)
    assert scheduler.pending() == 0
    assert scheduler.due_time("v") is None
    assert not _wait_for_calls(calls, 2, 0.2)


def test_schedule_during_a_run_wins_over_its_result(schedulers: list[RenewalScheduler]) -> None:
    started, release = threading.Event(), threading.Event()

    def renew(volume_id: str) -> float | None:
        started.set()
        assert release.wait(WAIT)
        return None  # would forget the volume

    scheduler = RenewalScheduler(renew)
    schedulers.append(scheduler)
    scheduler.start()
    scheduler.schedule("v", time.time())
    assert started.wait(WAIT)
    later = time.time() + 3600
    scheduler.schedule("v", later)
    release.set()
    wait_until(lambda: scheduler.running() == 0)
    assert scheduler.due_time("v") == later


def test_cancel_prevents_a_queued_run_that_has_not_started(
    schedulers: list[RenewalScheduler],
) -> None:
    release = threading.Event()
    calls: list[str] = []

    def renew(volume_id: str) -> float | None:
        calls.append(volume_id)
        assert release.wait(WAIT)
        return None

    scheduler = RenewalScheduler(renew, workers=1)
    schedulers.append(scheduler)
    scheduler.start()
    scheduler.schedule("busy", time.time())
    wait_until(lambda: calls == ["busy"])  # the single worker is busy
    scheduler.schedule("queued", time.time())
    wait_until(lambda: scheduler.running() == 2)  # handed to the pool, waiting for the worker
    scheduler.cancel("queued")
    release.set()
    wait_until(lambda: scheduler.running() == 0)
    assert calls == ["busy"]


def test_a_volume_is_never_renewed_twice_at_once(schedulers: list[RenewalScheduler]) -> None:
    in_flight: set[str] = set()
    lock = threading.Lock()
    overlaps: list[str] = []
    runs = 0
    stop = threading.Event()

    def renew(volume_id: str) -> float | None:
        nonlocal runs
        with lock:
            if volume_id in in_flight:
                overlaps.append(volume_id)
            in_flight.add(volume_id)
            runs += 1
        time.sleep(0.001)
        with lock:
            in_flight.discard(volume_id)
        return None if stop.is_set() else time.time()  # due again at once

    scheduler = RenewalScheduler(renew, workers=4)
    schedulers.append(scheduler)
    scheduler.start()
    volumes = [f"v{i}" for i in range(5)]

    def hammer() -> None:
        for _ in range(300):
            for volume_id in volumes:
                scheduler.schedule(volume_id, time.time())

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(lambda: runs >= 50)
    stop.set()
    scheduler.stop()
    assert runs >= 50
    assert overlaps == []


def test_idle_scheduler_sleeps_until_the_earliest_due_time(
    schedulers: list[RenewalScheduler],
) -> None:
    calls: list[str] = []
    ran = threading.Event()

    def renew(volume_id: str) -> float | None:
        calls.append(volume_id)
        ran.set()
        return None

    scheduler = RenewalScheduler(renew)
    schedulers.append(scheduler)
    scheduler.start()
    far = time.time() + 30 * DAY
    for i in range(1000):
        scheduler.schedule(f"v{i}", far + i)
    assert scheduler.pending() == 1000
    # The thread is asleep, waiting for the earliest of the 1000, its sleep capped at
    # max_sleep_seconds (an internal field: finite while it sleeps on a deadline).
    wait_until(lambda: 0 < scheduler._sleep_until < math.inf)
    assert scheduler._sleep_until <= far
    before = scheduler.wakeups
    assert before <= 1  # at most the first schedule() woke it
    time.sleep(0.5)
    assert scheduler.wakeups - before == 0  # blocked on the condition: no ticks, no polling
    assert calls == []

    # An earlier due time wakes it at once (it does not wait out its long sleep).
    scheduler.schedule("soon", time.time() + 0.02)
    assert ran.wait(WAIT)
    assert calls == ["soon"]
    assert scheduler.pending() == 1000


def test_a_due_time_after_the_next_look_does_not_wake_the_thread(
    schedulers: list[RenewalScheduler],
) -> None:
    """A new volume's renewal, weeks away, costs its publish no wake-up of the thread: the
    thread looks again by the end of its capped sleep anyway. An earlier one still wakes it."""
    clock = FakeClock(0.0)
    calls: list[str] = []
    scheduler = RenewalScheduler(lambda volume_id: calls.append(volume_id), clock=clock)
    scheduler.max_sleep_seconds = 50.0  # real seconds the thread may sleep; the test waits less
    schedulers.append(scheduler)
    scheduler.start()
    scheduler.schedule("a", 100.0)
    wait_until(lambda: scheduler._sleep_until == 50.0)  # capped: it looks again at 50
    before = scheduler.wakeups

    scheduler.schedule("b", 60.0)  # after its next look: no notify
    time.sleep(0.2)
    assert scheduler.wakeups == before
    assert scheduler._sleep_until == 50.0

    scheduler.schedule("c", 40.0)  # before it: woken at once, now sleeping until 40
    wait_until(lambda: scheduler._sleep_until == 40.0)
    assert scheduler.wakeups == before + 1

    clock.advance(100.0)
    scheduler.wake()
    wait_until(lambda: len(calls) == 3)
    assert sorted(calls) == ["a", "b", "c"]  # nothing lost: all three ran once due


def test_stop_waits_for_running_renewals_and_dispatches_nothing_more() -> None:
    started = threading.Event()
    finished = threading.Event()
    calls: list[str] = []

    def renew(volume_id: str) -> float | None:
        calls.append(volume_id)
        started.set()
        time.sleep(0.1)
        finished.set()
        return time.time()

    scheduler = RenewalScheduler(renew)
    scheduler.start()
    scheduler.schedule("v", time.time())
    assert started.wait(WAIT)
    scheduler.stop(timeout=WAIT)
    assert finished.is_set()
    assert scheduler.running() == 0
    time.sleep(0.1)
    assert calls == ["v"]


def test_stop_without_start_and_double_start() -> None:
    scheduler = RenewalScheduler(lambda volume_id: None)
    scheduler.stop()
    scheduler.start()
    with pytest.raises(RuntimeError):
        scheduler.start()
    scheduler.stop()


def test_replaced_entries_do_not_pile_up(schedulers: list[RenewalScheduler]) -> None:
    scheduler = RenewalScheduler(lambda volume_id: None)
    far = time.time() + DAY
    for i in range(10_000):
        scheduler.schedule("v", far + i)
    assert scheduler.pending() == 1
    assert scheduler.due_time("v") == far + 9_999
    assert len(scheduler._heap) <= 2 * 1 + 64 + 1


def test_renew_that_schedules_itself_also_resets_the_backoff(
    schedulers: list[RenewalScheduler],
) -> None:
    """The volume manager schedules the next renewal from inside renew(); that must count as a
    success too, so the next failure starts again at the shortest delay."""
    clock = FakeClock()
    outcomes = iter([False, False, True, False])
    retries: list[int] = []
    done = threading.Event()
    scheduler: RenewalScheduler

    def renew(volume_id: str) -> float | None:
        if not next(outcomes, True):
            raise RuntimeError("issuer unavailable")
        scheduler.schedule(volume_id, clock())  # what VolumeManager._commit does
        return clock()

    def on_retry(volume_id: str, attempt: int, delay: float) -> None:
        retries.append(attempt)
        if len(retries) == 3:
            done.set()
            return
        clock.advance(delay)
        scheduler.wake()

    scheduler = RenewalScheduler(renew, clock=clock, on_retry=on_retry)
    schedulers.append(scheduler)
    scheduler.start()
    scheduler.schedule("v", clock())
    assert done.wait(WAIT)
    assert retries == [1, 2, 1]


# ------------------------------------------------------------------- renew-before and the floor


@pytest.mark.parametrize("renew_before", [60, 120, 10_000])
def test_renew_before_not_shorter_than_the_granted_lifetime_renews_at_two_thirds(
    renew_before: int,
) -> None:
    # --max-duration 1m granted 60 s although renew-before asks for 60 s or more: on main the
    # due time was notBefore itself, so the volume renewed again at once, in a loop.
    plan = plan_renewal(1000.0, 1060.0, renew_before, random.Random(1))
    assert plan.renew_before_ignored
    assert 1040.0 - 60 * SPREAD_FRACTION <= plan.due <= 1040.0


def test_renew_before_that_fits_is_used_and_not_reported() -> None:
    plan = plan_renewal(0.0, 3600.0, 600, random.Random(1))
    assert not plan.renew_before_ignored
    assert 3000.0 - 180 <= plan.due <= 3000.0


@settings(deadline=None)
@given(
    not_before=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    lifetime=st.floats(min_value=0, max_value=100.0, allow_nan=False),
    renew_before=st.one_of(st.none(), st.integers(min_value=0, max_value=1000)),
    late=st.floats(min_value=0, max_value=1000.0, allow_nan=False),
    floor=st.floats(min_value=0, max_value=60.0, allow_nan=False),
)
def test_planned_renewal_is_never_sooner_than_the_floor_after_now(
    not_before: float, lifetime: float, renew_before: int | None, late: float, floor: float
) -> None:
    # Whatever the certificate (even one that expired before it was stored), never a loop.
    now = not_before + late
    plan = plan_renewal(
        not_before,
        not_before + lifetime,
        renew_before,
        random.Random(0),
        now=now,
        min_interval=floor,
    )
    assert plan.due >= now + floor


def test_scheduler_never_starts_a_volume_again_within_the_minimum_interval(
    schedulers: list[RenewalScheduler],
) -> None:
    # renew() asks to run again at once (what a 1 s certificate did on main: 625 renewals in
    # 10 s). With a 30 s floor the next start waits for the clock to reach start + 30 s.
    clock = FakeClock()
    starts: list[float] = []

    def renew(volume_id: str) -> float | None:
        starts.append(clock())
        return clock()  # "due now"

    scheduler = RenewalScheduler(renew, clock=clock, min_interval=30.0)
    schedulers.append(scheduler)
    scheduler.start()
    begin = clock()
    scheduler.schedule("v", begin)
    wait_until(lambda: scheduler.due_time("v") == begin + 30.0)
    assert starts == [begin]
    clock.advance(29.0)
    scheduler.wake()
    scheduler.schedule("v", clock())  # an explicit "now" (a CA rotation) waits for the floor too
    wait_until(lambda: scheduler.due_time("v") == begin + 30.0)
    assert starts == [begin]
    clock.advance(1.0)
    scheduler.wake()
    wait_until(lambda: len(starts) == 2)
    assert starts == [begin, begin + 30.0]
    wait_until(lambda: scheduler.due_time("v") == begin + 60.0)


def test_failed_renewals_retry_no_sooner_than_the_minimum_interval(
    schedulers: list[RenewalScheduler],
) -> None:
    clock = FakeClock()
    starts: list[float] = []

    def renew(volume_id: str) -> float | None:
        starts.append(clock())
        raise RuntimeError("issuer down")

    scheduler = RenewalScheduler(renew, clock=clock, min_interval=30.0, rng=random.Random(0))
    schedulers.append(scheduler)
    scheduler.start()
    begin = clock()
    scheduler.schedule("v", begin)
    # The first backoff is 1-2 s; the floor moves it to begin + 30 when it comes due.
    wait_until(lambda: len(starts) == 1 and scheduler.due_time("v") is not None)
    backoff_due = scheduler.due_time("v")
    assert backoff_due is not None and backoff_due < begin + 30.0
    clock.advance(backoff_due - begin)
    scheduler.wake()
    wait_until(lambda: scheduler.due_time("v") == begin + 30.0)
    assert starts == [begin]
