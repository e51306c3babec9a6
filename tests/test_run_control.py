"""RunControl: preemption signals, exit interval and duration, consecutive skipped steps, and the
cross-rank agreement on when to stop."""

import os
import signal

import pytest
from engine_harness import spawn_gloo

from megatron_mellama.config import parse_config
from megatron_mellama.training import run_control
from megatron_mellama.training.run_control import RunControl


def _cfg(*flags):
    return parse_config(["--model", "tiny", "--vocab-size", "128", "--seq-length", "16", "--train-iters", "100",
                         *flags])


@pytest.fixture
def control():
    made = []

    def make(*flags):
        made.append(RunControl(_cfg(*flags)))
        return made[-1]

    yield make
    # last made first: each put its predecessor's handler in, so the first one's restore ends at the
    # handlers the test started with
    for rc in reversed(made):
        rc.restore_handlers()


def test_nothing_set_never_stops(control):
    rc = control()
    assert all(rc.should_stop(i) == (False, "", False, False) for i in range(1, 50))
    assert rc.too_many_skipped() is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_flag_without_killing(control, sig):
    rc = control()
    # start-up over, as the loop says before its first step: SIGTERM is now kept, not fatal
    assert not rc.preempted()
    assert rc.should_stop(1)[0] is False
    os.kill(os.getpid(), sig)  # the handler runs before the next bytecode of the main thread
    stop, reason, save, preempted = rc.should_stop(2)
    assert (stop, save, preempted) == (True, True, True)
    assert sig.name in reason


def test_restore_handlers_puts_back_the_previous_ones():
    before = signal.getsignal(signal.SIGTERM)
    with RunControl(_cfg()) as rc:
        assert signal.getsignal(signal.SIGTERM) == rc.signals._handle
    assert signal.getsignal(signal.SIGTERM) == before


def test_exit_interval(control):
    rc = control("--exit-interval", "5")
    stops = [i for i in range(1, 16) if rc.should_stop(i)[0]]
    assert stops == [5, 10, 15]
    stop, reason, save, preempted = rc.should_stop(5)
    assert save and not preempted and "exit interval" in reason


def test_exit_duration(control, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(run_control.time, "monotonic", lambda: now[0])
    rc = control("--exit-duration-in-mins", "2")
    now[0] += 119.0
    assert rc.should_stop(1)[0] is False
    now[0] += 2.0
    stop, reason, save, preempted = rc.should_stop(2)
    assert (stop, save, preempted) == (True, True, False) and "duration" in reason


def test_consecutive_skipped_steps_reset_on_a_good_step(control):
    rc = control("--max-skipped-steps", "3")
    for skipped in (True, True, False, True, True):
        rc.record_step(skipped)
        assert rc.too_many_skipped() is None
    rc.record_step(True)
    message = rc.too_many_skipped()
    assert message is not None and "3 consecutive" in message
    rc.record_step(False)
    assert rc.too_many_skipped() is None


def _stop_after_sigterm_on_rank_1(rank, world):
    rc = RunControl(_cfg())
    try:
        # start-up over, as the loop says before its first step: SIGTERM is now kept, not fatal
        assert not rc.preempted()
        for iteration in range(1, 20):
            if rank == 1 and iteration == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            stop, reason, save, _ = rc.should_stop(iteration)
            if stop:
                return iteration, save, reason
        return None
    finally:
        rc.restore_handlers()


@pytest.mark.slow
def test_signal_on_one_rank_stops_all_ranks_at_the_same_iteration(tmp_path):
    rank0, rank1 = spawn_gloo(_stop_after_sigterm_on_rank_1, 2, (), str(tmp_path))
    assert rank0[:2] == rank1[:2] == (4, True)
    assert "SIGTERM" in rank1[2] and "another rank" in rank0[2]


def test_max_skipped_steps_defaults_to_ten_and_zero_never_stops(control):
    rc = control()
    for _ in range(9):
        rc.record_step(True)
    assert rc.too_many_skipped() is None
    rc.record_step(True)
    assert "10 consecutive" in rc.too_many_skipped() and "--max-skipped-steps is 10" in rc.too_many_skipped()
    never = control("--max-skipped-steps", "0")
    for _ in range(1000):
        never.record_step(True)
    assert never.too_many_skipped() is None and never.every_step_skipped() is None


def test_absorbed_fp16_overflows_neither_count_nor_reset(control):
    rc = control("--max-skipped-steps", "3")
    for _ in range(50):  # the dynamic loss scale coming down from 2**32
        rc.record_step(True, absorbed=True)
    assert rc.too_many_skipped() is None and rc.every_step_skipped() is None
    rc.record_step(True)
    rc.record_step(True)
    rc.record_step(True, absorbed=True)  # between two counted ones: the run goes on
    assert rc.too_many_skipped() is None
    rc.record_step(True)
    assert "3 consecutive" in rc.too_many_skipped()


def test_every_step_skipped_is_reported_at_the_end_of_a_short_run(control):
    rc = control()
    assert rc.every_step_skipped() is None  # no step at all
    for _ in range(3):
        rc.record_step(True)
    assert rc.too_many_skipped() is None
    assert "every one of the 3 iterations" in rc.every_step_skipped()
    partly = control()
    for skipped in (False, True, True):
        partly.record_step(skipped)
    assert partly.every_step_skipped() is None


def test_a_run_that_ends_inside_a_streak_of_skipped_steps_is_reported(control):
    rc = control()
    for skipped in (False, True, True):
        rc.record_step(skipped)
    assert rc.last_step_skipped() and "ended inside a streak of 2 skipped iterations" in rc.ended_inside_skipped_steps()
    rc.record_step(True, absorbed=True)  # an fp16 overflow the scaler absorbed neither ends nor extends it
    assert "streak of 2" in rc.ended_inside_skipped_steps()
    rc.record_step(False)
    assert not rc.last_step_skipped() and rc.ended_inside_skipped_steps() is None
    every = control()
    for _ in range(3):
        every.record_step(True)
    assert "every one of the 3 iterations" in every.ended_inside_skipped_steps()
    never = control("--max-skipped-steps", "0")
    never.record_step(True)
    assert not never.last_step_skipped() and never.ended_inside_skipped_steps() is None
