"""Where the broker does its disk work: the mode policy (broker/modes.py)
as pure unit tests, then real brokers forced into each mode, with real
processes, sockets and LMDB, showing which requests are answered while a
large spill is under way.

Order is proved from what the processes see, never from timings: a STATS
reply is built by the broker at one moment, and says whether the big move
was finished then."""

from __future__ import annotations

import pytest

from tfem.broker.modes import Mode, ModePolicy, Route, Thresholds

# ---- the policy, as pure unit tests ----

T = Thresholds(slow_s=0.005, big_job_bytes=8 << 20, calm_s=1.0)
SMALL_JOB, BIG_JOB = 256 << 10, 64 << 20


def adaptive(now: float = 0.0) -> ModePolicy:
    return ModePolicy("adaptive", T, now)


def test_a_new_policy_starts_sync_and_a_bad_setting_is_refused():
    p = adaptive()
    assert (p.mode, p.switches, p.last_switch) == (Mode.SYNC, 0, None)
    with pytest.raises(ValueError, match="adaptive, sync, async"):
        ModePolicy("fast")


def test_light_load_stays_inline():
    p = adaptive()
    for i in range(100):
        now = i * 0.01
        assert p.route(now, SMALL_JOB, worker_jobs=0) is Route.INLINE
        p.inline_done(now, 0.001, others_waiting=False)
        p.tick(now, worker_jobs=0)
    assert (p.mode, p.switches) == (Mode.SYNC, 0)


def test_slow_inline_work_nobody_waited_for_stays_inline():
    """A lone client's slow jobs delay nobody: no reason to pay handoffs."""
    p = adaptive()
    for i in range(10):
        assert p.route(i, 4 << 20, 0) is Route.INLINE
        p.inline_done(i, 0.050, others_waiting=False)
    assert p.mode is Mode.SYNC


def test_one_slow_inline_job_with_requests_waiting_switches_to_async():
    p = adaptive()
    assert p.route(1.0, SMALL_JOB, 0) is Route.INLINE
    p.inline_done(1.0, T.slow_s, others_waiting=True)
    assert (p.mode, p.switches) == (Mode.ASYNC, 1)
    assert p.last_switch is not None and p.last_switch.to is Mode.ASYNC and p.last_switch.at == 1.0
    assert "waited" in p.last_switch.why
    assert p.route(1.1, SMALL_JOB, 0) is Route.WORKER  # from now on, even small jobs


def test_waited_work_is_summed_until_a_job_ends_with_nobody_waiting():
    p = adaptive()
    p.inline_done(0.0, 0.002, others_waiting=True)
    p.inline_done(0.1, 0.002, others_waiting=True)
    assert p.mode is Mode.SYNC  # 4 ms so far
    p.inline_done(0.2, 0.001, others_waiting=False)  # the backlog cleared: start again
    p.inline_done(0.3, 0.002, others_waiting=True)
    p.inline_done(0.4, 0.002, others_waiting=True)
    assert p.mode is Mode.SYNC  # 4 ms again
    p.inline_done(0.5, 0.001, others_waiting=True)
    assert (p.mode, p.switches) == (Mode.ASYNC, 1)  # 5 ms of inline work others waited behind


def test_a_job_known_to_be_big_goes_to_the_worker_and_switches():
    p = adaptive()
    assert p.route(2.0, T.big_job_bytes - 1, 0) is Route.INLINE
    assert p.route(2.0, T.big_job_bytes, 0) is Route.WORKER
    assert (p.mode, p.switches) == (Mode.ASYNC, 1)
    assert p.last_switch is not None and str(T.big_job_bytes) in p.last_switch.why


def test_never_inline_beside_the_worker():
    """Whatever the mode says, a job while the worker has some queues there:
    one thread at a time changes the table and the store, and a client's
    jobs keep its order."""
    p = adaptive()
    assert p.mode is Mode.SYNC
    assert p.route(0.0, 0, worker_jobs=1) is Route.WORKER
    assert (p.mode, p.switches) == (Mode.SYNC, 0)  # not a switch by itself


def test_back_to_sync_after_a_calm_second_with_the_worker_idle():
    p = adaptive()
    p.route(10.0, BIG_JOB, 0)  # async at t=10
    p.tick(10.5, worker_jobs=1)
    p.tick(10.9, worker_jobs=0)
    assert p.mode is Mode.ASYNC  # not calm long enough
    p.tick(11.0, worker_jobs=1)
    assert p.mode is Mode.ASYNC  # calm long enough, but the worker is busy
    p.tick(11.0, worker_jobs=0)
    assert (p.mode, p.switches) == (Mode.SYNC, 2)
    assert p.last_switch is not None and p.last_switch.to is Mode.SYNC and p.last_switch.at == 11.0


def test_work_that_delays_someone_keeps_async_hysteresis():
    p = adaptive()
    p.route(0.0, BIG_JOB, 0)
    for t in (0.5, 1.2, 1.9, 2.6):  # a request arrives while the worker is busy, now and then
        p.delayed(t)
        p.tick(t + 0.1, worker_jobs=0)
        assert p.mode is Mode.ASYNC
    p.tick(2.6 + T.calm_s - 0.01, worker_jobs=0)
    assert p.mode is Mode.ASYNC
    p.tick(2.6 + T.calm_s, worker_jobs=0)
    assert (p.mode, p.switches) == (Mode.SYNC, 2)


def test_delays_seen_in_sync_mode_do_not_count_later():
    p = adaptive()
    p.delayed(5.0)  # sync: nothing to keep
    p.route(5.5, BIG_JOB, 0)  # async at 5.5: calm counts from the switch
    p.tick(5.5 + T.calm_s, worker_jobs=0)
    assert p.mode is Mode.SYNC


def test_it_does_not_flap():
    """Under a load that comes and goes quickly, the mode changes at most
    once per calm period, however many slow moments there are."""
    p = adaptive()
    now = 0.0
    for i in range(1000):  # 10 s: every 10 ms a slow job with waiters, then a quiet 10 ms
        now = i * 0.01
        if p.route(now, SMALL_JOB, 0) is Route.INLINE:
            p.inline_done(now, 0.006, others_waiting=i % 2 == 0)
        elif i % 2 == 0:
            p.delayed(now)
        p.tick(now + 0.005, worker_jobs=0)
    assert (p.mode, p.switches) == (Mode.ASYNC, 1)


def test_a_quiet_broker_returns_to_sync_and_switches_again_when_loaded():
    p = adaptive()
    p.inline_done(0.0, 0.010, others_waiting=True)
    p.tick(1.0, 0)
    assert (p.mode, p.switches) == (Mode.SYNC, 2)
    assert p.route(1.1, SMALL_JOB, 0) is Route.INLINE
    p.inline_done(1.1, 0.010, others_waiting=True)
    assert (p.mode, p.switches) == (Mode.ASYNC, 3)


@pytest.mark.parametrize("setting, route", [("sync", Route.INLINE), ("async", Route.WORKER)])
def test_a_forced_mode_never_switches(setting, route):
    p = ModePolicy(setting, T)
    assert p.mode is Mode(setting)
    for i in range(50):
        now = i * 0.5
        assert p.route(now, BIG_JOB if i % 2 else SMALL_JOB, worker_jobs=i % 3) is route
        p.inline_done(now, 0.1, others_waiting=True)
        p.delayed(now)
        p.tick(now + 5, worker_jobs=0)
    assert (p.mode, p.switches, p.last_switch) == (Mode(setting), 0, None)
