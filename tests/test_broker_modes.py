"""Where the broker does its disk work: the mode policy (broker/modes.py)
as pure unit tests, then real brokers forced into each mode, with real
processes, sockets and LMDB, showing which requests are answered while a
large spill is under way.

Order is proved from what the processes see, never from timings: a STATS
reply is built by the broker at one moment, and says whether the big move
was finished then."""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Callable

import pytest

from tfem.broker.modes import SETTINGS, Mode, ModePolicy, Route, Thresholds
from tfem.cli import BROKER_MODES

from tests._instances import SMALL, RunningInstance
from tests._modes_worker import pattern
from tests._proc_tools import Worker, tfem_cli, wait_until
from tests._tfem_worker import KIB, MIB, content

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


def test_the_command_line_offers_the_policy_settings():
    assert BROKER_MODES == SETTINGS


# ---- real brokers, forced into each mode ----

MODES_WORKER = str(pathlib.Path(__file__).with_name("_modes_worker.py"))

# A 256 MiB arena almost filled by one published file, BALLAST: a writer
# whose single write finds the arena full asks for room (ALLOC), and the
# broker answers it by moving BALLAST to the spill store, one disk job of
# 240 MiB (a few hundred ms here). While it moves it, the broker holds it
# as its reader, which any client sees in the segment: the prober starts
# asking then. FILLER, published last, is what the prober's own small
# ALLOC evicts.
ARENA = ("--memory", "256M", "--block-size", "64K", "--buf-size", "8K", "--slots", "64")
BALLAST, BALLAST_SIZE = "ballast", 240 * MIB
FILLER, FILLER_SIZE = "filler", 64 * KIB
BIG, BIG_SIZE = "big", 48 * MIB
PROBE_SIZE = 64 * KIB


@pytest.fixture
def mode_workers(workers: Callable[..., Worker]) -> Callable[..., Worker]:
    """start(env, command, *args) -> Worker of _modes_worker.py; all are
    killed at teardown, whatever the test did."""
    return lambda env, *args: workers(env, *args, script=MODES_WORKER)


def status(inst: RunningInstance) -> dict[str, Any]:
    return dict(json.loads(inst.tfem("status", "--json").stdout))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spill_under_probe(inst: RunningInstance, mode_workers: Callable[..., Worker]) -> dict[str, Any]:
    """Publish BALLAST and FILLER, start the prober, have the writer write
    BIG (its ALLOC moves BALLAST), and return what the prober saw. Every
    file is checked byte for byte afterwards."""
    with inst.connect() as client:
        for name, size in ((BALLAST, BALLAST_SIZE), (FILLER, FILLER_SIZE)):
            with client.open(name, "w") as f:
                f.write(pattern(name, size))
        prober = mode_workers(inst.env, "prober", BALLAST, str(PROBE_SIZE))
        writer = mode_workers(inst.env, "writer", BIG, str(BIG_SIZE))
        prober.expect("ready", timeout=60)
        writer.expect("ready", timeout=60)
        writer.send("go")
        assert prober.expect("held")
        probed = prober.expect("probed")
        writer.expect("written")
        assert prober.finish() == 0 and writer.finish() == 0, prober.stderr + writer.stderr
        assert client.stat(BALLAST).spilled and not client.stat(BIG).spilled
        for name, size in ((BALLAST, BALLAST_SIZE), (BIG, BIG_SIZE), (FILLER, FILLER_SIZE),
                           (probed["small"], PROBE_SIZE)):
            with client.open(name, "r") as f:
                assert digest(f.read()) == digest(pattern(name, size)), name
        assert client.list() == []
    return probed


def moving(seen: dict[str, Any]) -> bool:
    """The broker still held BALLAST (moving it) when it built this reply."""
    return bool(seen["by_state"]["READ"] == 1 and seen["spilled_bytes"] < BALLAST_SIZE)


def moved(seen: dict[str, Any]) -> bool:
    """BALLAST was in the spill store, the move over, when it built this reply."""
    return bool(seen["by_state"]["READ"] == 0 and seen["spilled_bytes"] >= BALLAST_SIZE - 8 * KIB)


@pytest.mark.parametrize("mode", ["async", "adaptive"])
def test_others_are_answered_while_a_big_spill_runs(instance_factory, mode_workers, mode):
    """With the disk work on the worker, STATS, a new client's HELLO and a
    small write that needs an ALLOC (evicting FILLER) are all answered
    while the broker is still moving BALLAST for the writer: each STATS
    reply, the last one asked after the HELLO and the ALLOC were answered,
    shows the move unfinished."""
    inst = instance_factory(*ARENA, "--broker-mode", mode)
    probed = spill_under_probe(inst, mode_workers)
    for when in ("first", "after_hello", "after_alloc"):
        assert moving(probed[when]), (when, probed[when])
    assert not probed["small_spilled"]  # its ALLOC evicted FILLER: the arena made room
    assert probed["after_alloc"]["mode"]["mode"] == "async"
    st = status(inst)["broker_mode"]
    assert st["setting"] == mode and st["disk_jobs_on_worker"] >= 2
    if mode == "adaptive":  # the big job switched it; nothing waits now: back to sync after a calm second
        assert st["switches"] >= 1
        last = wait_until(lambda: (s := status(inst)["broker_mode"])["mode"] == "sync" and s, 10,
                          "the broker to return to sync")
        assert last["switches"] == st["switches"] + (st["mode"] == "async")
        assert "delayed nobody" in last["last_switch"]["why"]
    else:
        assert (st["mode"], st["switches"], st["disk_jobs_inline"]) == ("async", 0, 0)


def test_forced_sync_serves_in_arrival_order(instance_factory, mode_workers):
    """In the loop, the big move is served whole first: the prober's STATS,
    sent while the broker held BALLAST, was answered only once it was
    moved, and so was everything after it."""
    inst = instance_factory(*ARENA, "--broker-mode", "sync")
    probed = spill_under_probe(inst, mode_workers)
    for when in ("first", "after_hello", "after_alloc"):
        assert moved(probed[when]), (when, probed[when])
    st = status(inst)["broker_mode"]
    assert (st["setting"], st["mode"], st["switches"], st["disk_jobs_on_worker"]) == ("sync", "sync", 0, 0)
    assert st["disk_jobs_inline"] >= 2


def test_status_shows_the_mode_and_its_switches(instance_factory):
    inst = instance_factory(*SMALL, "--broker-mode", "async")
    with inst.connect() as client:
        with client.open("spills", "w") as f:  # larger than the 1 MiB arena: disk jobs
            f.write(content("spills", 3 * MIB))
    text = inst.tfem("status").stdout.decode()
    line = next(line for line in text.splitlines() if line.startswith("disk work"))
    assert "forced async, 0 switches" in line and "on the worker" in line, line
    st = status(inst)["broker_mode"]
    assert (st["setting"], st["mode"], st["switches"], st["last_switch"]) == ("async", "async", 0, None)
    assert st["disk_jobs_on_worker"] >= 2 and st["disk_jobs_inline"] == 0

    inst = instance_factory(*SMALL, subdir="adaptive")  # the default
    st = status(inst)["broker_mode"]
    assert (st["setting"], st["mode"], st["switches"]) == ("adaptive", "sync", 0)
    assert "disk work   adaptive, now sync, 0 switches" in inst.tfem("status").stdout.decode()


@pytest.mark.parametrize("command", ["up", "broker"])
def test_a_bad_mode_is_a_usage_error(tmp_path, command):
    keyfile = tmp_path / "bad.key"
    result = tfem_cli(command, "--keyfile", str(keyfile), "--broker-mode", "fast")
    assert result.returncode == 2
    err = result.stderr.decode()
    assert "--broker-mode" in err and "invalid choice: 'fast'" in err and "adaptive" in err, err
    assert "Traceback" not in err
    assert not keyfile.exists()


# ---- what else the worker runs: dead clients, a replaced segment ----


def test_a_killed_writers_spilled_file_is_dropped_in_async_mode(instance_factory, steps_workers):
    """Settling a dead client is a job of the worker's, run alone: its
    spilled file goes, records and all."""
    inst = instance_factory(*SMALL, "--broker-mode", "async")
    w = steps_workers(inst.env)
    w.do("open", name="dead/spilled", mode="w")
    w.do("write", name="dead/spilled", start=0, end=6 * MIB)  # past the 1 MiB arena, sent to the store at once
    with inst.connect() as client:
        assert client.stats()["spilled_files"] == 1
        w.kill()
        # STATS is a near snapshot beside the worker: wait for all of it.
        wait_until(lambda: (s := client.stats())["slots_used"] == 0 and s["spilled_files"] == 0
                   and s["dead_clients_settled"] == 1, 10, "the dead writer settled, its file and records gone")
        wait_until(lambda: client.stats()["spill_store"]["raw_bytes"] == 0, 10, "its records deleted")


def test_a_removed_segment_is_made_again_in_async_mode(instance_factory):
    """Relocation (the broker writing files into a new segment through its
    own requests, ask_self) runs on the worker, spilled files included."""
    import os

    inst = instance_factory(*SMALL, "--broker-mode", "async")
    path = "/dev/shm" + inst.names.segment
    sizes = {"reloc/inline": 300, "reloc/blocks": 40 * KIB, "reloc/spilled": 3 * MIB}
    with inst.connect() as old:
        for name, size in sizes.items():
            with old.open(name, "w") as f:
                f.write(content(name, size))
        before = os.stat(path).st_ino
        os.unlink(path)
        wait_until(lambda: os.path.exists(path) and os.stat(path).st_ino != before, 10, "a new segment")
        with inst.connect() as new:
            for name, size in sizes.items():
                with new.open(name, "r", timeout=10) as f:
                    assert f.read() == content(name, size), name
            st = new.stats()
            assert st["segments_replaced"] == 1 and st["spilled_files"] == 0
            assert st["broker_mode"]["disk_jobs_inline"] == 0
