"""Loss spikes and bad steps: the spike rules, --spike-action skip and rollback, --iterations-to-skip,
a non-finite step recomputed once (a transient fault named, a persistent one skipped), and the
fault kinds that test them (loss-spike, nan, nan-transient)."""

import json
import math
import os
import shutil

import pytest
import torch

from engine_harness import TINY, global_batches, micro_batches_of, rank_engine, spawn_gloo
from megatron_mellama.checkpoint.convert import StoredModel
from megatron_mellama.config import ConfigError, parse_config
from megatron_mellama.pretrain import load_run_config, main
from megatron_mellama.training.bad_steps import BadSteps
from megatron_mellama.training.engine import NONFINITE, Engine, StepResult
from megatron_mellama.training.fault_injection import Fault, FaultInjector, parse_faults
from megatron_mellama.training.loop import train
from megatron_mellama.training.loss_scaler import LossScaler
from megatron_mellama.training.spikes import SpikeDetector, SpikeGuard

RUN = ["--model", "tiny", "--mock-data", "--vocab-size", "128", "--seq-length", "16", "--num-layers", "2",
       "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "0", "--num-workers", "0",
       "--log-interval", "1"]
SPIKES = ["--check-for-spiky-loss", "--spike-window", "3"]


# -- the rules -------------------------------------------------------------------------------------
def test_the_factor_rule_is_megatrons_and_the_zscore_rule_waits_for_a_full_window():
    d = SpikeDetector(factor=10, zscore=3, window=4)
    assert d.check(1e6) is None  # nothing to compare with yet
    for i, loss in enumerate([2.0, 2.2, 1.9], start=1):
        d.record(i, loss)
    assert "more than 10x the largest of the last 3 (2.2)" in d.check(22.5)
    assert d.check(21.9) is None  # far above, but under 10x and the window is not full: no z-score yet
    d.record(4, 2.1)
    # mean 2.05, std 0.112: 2.4 is 3.1 standard deviations above, 2.35 only 2.7
    assert "3.1 standard deviations above the mean of the last 4" in d.check(2.4)
    assert d.check(2.35) is None
    d.record(5, 2.0)  # the window slides: 2.0 leaves... and 2.2 stays the largest
    assert [x for _, x in d.recent] == [2.2, 1.9, 2.1, 2.0]


def test_a_flat_window_has_no_zscore_and_a_rollback_forgets_the_iterations_after_it():
    d = SpikeDetector(factor=10, zscore=3, window=3)
    for i in range(1, 4):
        d.record(i, 5.0)
    assert d.check(5.001) is None and d.check(49.0) is None and d.check(50.1) is not None
    assert SpikeDetector(zscore=0, window=2).check(1.0) is None
    d.forget_after(1)
    assert list(d.recent) == [(1, 5.0)]


def test_only_applied_finite_losses_enter_the_window():
    guard = SpikeGuard(SpikeDetector(window=4), "skip")
    guard.seen(1, StepResult(2.0, 1.0, False, 1e-3))
    guard.seen(2, StepResult(math.nan, math.nan, True, 1e-3, why=NONFINITE))
    assert guard.judge(30.0, 1.0) is not None  # a spike, not applied under `skip`
    assert guard.seen(3, StepResult(30.0, 1.0, True, 1e-3, why="a loss spike")).startswith("a loss spike")
    assert list(guard.detector.recent) == [(1, 2.0)]
    logging_only = SpikeGuard(SpikeDetector(window=4), "log")
    logging_only.seen(1, StepResult(2.0, 1.0, False, 1e-3))
    assert logging_only.judge(30.0, 1.0) is None  # `log` applies it


# -- the engine: a judge that skips, a non-finite step recomputed ----------------------------------
def _engine(extra=()):
    cfg = parse_config(TINY + ["--num-layers", "2", *extra])
    return cfg, Engine(cfg)


def _batch(cfg, index=0):
    return micro_batches_of(global_batches(cfg, index + 1)[index], cfg, 0, 1)


def test_a_step_its_judge_rejects_is_not_applied():
    cfg, engine = _engine()
    before = engine.full_state()
    result = engine.step(_batch(cfg), judge=lambda loss, norm: "a loss spike (test)")
    assert result.skipped and result.why == "a loss spike (test)" and math.isfinite(result.loss)
    assert all(torch.equal(before[k], v) for k, v in engine.full_state().items())
    assert engine.scheduler.num_steps == 0 and not engine.optimizer.state
    assert all(p.grad is None for p in engine.modules[0].parameters())
    applied = engine.step(_batch(cfg), judge=lambda loss, norm: None)
    assert not applied.skipped and applied.loss == result.loss  # the same weights, the same batch
    assert engine.scheduler.num_steps == cfg.train.global_batch_size


def test_a_nan_step_is_recomputed_once_then_skipped_and_a_transient_one_is_applied():
    cfg, engine = _engine()
    clean_cfg, clean = _engine()
    calls = []
    compute = engine.compute_gradients
    engine.compute_gradients = lambda mbs: calls.append(1) or compute(mbs)
    before = engine.full_state()
    engine.injected_loss_factors = (math.nan,)  # nan
    result = engine.step(_batch(cfg))
    assert len(calls) == 2 and result.skipped and result.why == NONFINITE and math.isnan(result.loss)
    assert result.recomputed.startswith("rank 0 (") and engine.injected_loss_factors is None
    assert all(torch.equal(before[k], v) for k, v in engine.full_state().items())

    calls.clear()
    engine.injected_loss_factors = (math.nan, 1.0)  # nan-transient
    result = engine.step(_batch(cfg))
    want = clean.step(_batch(clean_cfg))
    assert len(calls) == 2 and not result.skipped and result.recomputed.startswith("rank 0 (")
    # the rerun's result is applied, from cleared gradients: the clean step's, bitwise
    assert (result.loss, result.grad_norm) == (want.loss, want.grad_norm)
    assert all(torch.equal(clean.full_state()[k], v) for k, v in engine.full_state().items())


def test_an_fp16_overflow_the_scaler_answers_is_not_recomputed():
    cfg, engine = _engine()
    engine.scaler = LossScaler(2.0 ** 16)  # dynamic, above its minimum
    calls = []
    engine._computed = lambda mbs, attempt: calls.append(attempt) or (2.0, math.inf)
    result = engine.step(_batch(cfg))
    assert calls == [0] and result.skipped and result.recomputed is None
    assert engine.scaler.loss_scale == 2.0 ** 16  # hysteresis 2: the first overflow keeps the scale


def _transient_rank(rank, world, argv):
    cfg, engine, coords, dp = rank_engine(rank, world, argv)
    batches = global_batches(cfg, 2)
    results = []
    for factors, batch in zip([(math.nan, 1.0), (math.nan,)], batches):
        engine.injected_loss_factors = factors if rank == 1 else None
        r = engine.step(micro_batches_of(batch, cfg, coords["dp"], dp))
        results.append((r.skipped, r.recomputed))
    return results


@pytest.mark.slow
def test_the_rank_whose_loss_was_not_finite_is_named(tmp_path):
    ranks = spawn_gloo(_transient_rank, 2, (TINY + ["--num-layers", "2"],), str(tmp_path))
    assert ranks[0] == ranks[1]  # every rank takes the same decision
    (transient_skipped, transient), (nan_skipped, nan) = ranks[0]
    assert not transient_skipped and transient.startswith("rank 1 (") and "rank 0" not in transient
    assert nan_skipped and nan.startswith("rank 1 (")


# -- the fault kinds -----------------------------------------------------------------------------------
def test_loss_faults_are_set_before_the_step_on_their_rank_only():
    faults = parse_faults(["loss-spike@2:1", "nan@3", "nan-transient@4"])
    assert faults[0] == Fault("loss-spike", 2, 1)

    class Engine_:
        injected_loss_factors = None

    e = Engine_()
    on_rank0 = FaultInjector(faults, rank=0, world=2)
    on_rank0.before_step(2, e)
    assert e.injected_loss_factors is None
    on_rank0.before_step(4, e)
    assert e.injected_loss_factors[1] == 1.0 and math.isnan(e.injected_loss_factors[0])
    FaultInjector(faults, rank=1, world=2).before_step(2, e)
    assert e.injected_loss_factors == (1e3,)
    on_rank0.after_step(3, e)  # nothing after the step for these kinds


@pytest.mark.parametrize("flags, message", [
    (["--spike-action", "rollback", "--check-for-spiky-loss"], "--spike-action rollback needs --save"),
    (["--iterations-to-skip", "3", "x"], "--iterations-to-skip x: expected iteration numbers"),
    (["--spike-window", "1"], "--spike-window must be at least 2"),
    (["--spiky-loss-factor", "1"], "--spiky-loss-factor must be above 1"),
])
def test_bad_flags_are_one_line_naming_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(RUN + ["--train-iters", "3"] + flags)


# -- whole runs ----------------------------------------------------------------------------------
def _log(path) -> dict:
    """The newest train record of each iteration in a JSON log: {iteration: (loss, lr)}."""
    records = [json.loads(line) for line in open(path)]
    return {r["iteration"]: (r["lm_loss"], r["lr"]) for r in records if "lm_loss" in r}


def _weights(ckpt) -> dict:
    stored = StoredModel(str(ckpt))
    return {name: stored.read(name) for name in stored.meta}


def _train_state(ckpt) -> dict:
    return json.loads((ckpt / "train_state.json").read_text())


def test_a_rollback_equals_a_fresh_run_that_skips_the_same_iterations_bitwise(tmp_path, capsys):
    run = RUN + ["--train-iters", "8", "--save-interval", "3"]
    rolled, fresh = tmp_path / "rolled", tmp_path / "fresh"
    # checkpoints at 3 and 6; the spike at 6 rolls back to 3 and skips 4-6 (window 4: 3 precedes it)
    history = train(load_run_config(run + SPIKES + [
        "--spike-action", "rollback", "--spike-rollback-window", "4", "--inject-fault", "loss-spike@6",
        "--save", str(rolled), "--log-file", str(tmp_path / "rolled.jsonl")]))
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "rolled back" in line)
    assert line.startswith("iteration 6: a loss spike (loss ") and "checkpoint of iteration 3" in line
    assert "iterations 4-6 will be skipped; iteration 3 of the --spike-rollback-window precedes" in line
    assert "(rollback 1 of --max-rollbacks 3)" in line
    event = next(json.loads(x) for x in open(tmp_path / "rolled.jsonl") if "rollback" in x)["rollback"]
    assert event["to_iteration"] == 3 and event["skipped_iterations"] == [4, 5, 6] and event["not_skipped"] == [3]

    by_hand = train(load_run_config(run + ["--iterations-to-skip", "4", "5", "6", "--save", str(fresh),
                                           "--log-file", str(tmp_path / "fresh.jsonl")]))
    got, want = _log(tmp_path / "rolled.jsonl"), _log(tmp_path / "fresh.jsonl")
    assert got == want and sorted(got) == list(range(1, 9))
    assert [got[i][0] for i in (4, 5, 6)] == [None] * 3 and got[4][1] == got[7][1]  # no scheduler step
    assert [x for x in history["losses"] if x == x] == [x for x in by_hand["losses"] if x == x]
    assert history["consumed_samples"] == by_hand["consumed_samples"] == 32
    end = "iter_0000008"
    rolled_weights, fresh_weights = _weights(rolled / end), _weights(fresh / end)
    assert rolled_weights.keys() == fresh_weights.keys()
    assert all(torch.equal(w, fresh_weights[name]) for name, w in rolled_weights.items())
    assert _train_state(rolled / end)["extra"]["rolled_back_iterations"] == [4, 5, 6]
    assert _train_state(rolled / end)["extra"]["rollbacks"] == 1

    # a run resumed from a checkpoint that records the rollback keeps skipping its iterations
    resumed = tmp_path / "resumed"
    shutil.copytree(rolled, resumed)
    for later in ("iter_0000006", end):
        shutil.rmtree(resumed / later)
    (resumed / "latest").write_text("3\n")
    state = _train_state(resumed / "iter_0000003")
    state["extra"].update(rollbacks=1, rolled_back_iterations=[4, 5, 6])
    (resumed / "iter_0000003" / "train_state.json").write_text(json.dumps(state))
    os.remove(resumed / "iter_0000003" / "checksums.json")
    again = train(load_run_config(run + ["--save", str(resumed), "--load", str(resumed)]))
    assert again["losses"][3:] == by_hand["losses"][6:] and all(math.isnan(x) for x in again["losses"][:3])
    assert _train_state(resumed / end)["extra"]["rollbacks"] == 1


def test_a_spike_is_skipped_and_a_rollback_without_a_checkpoint_skips_it(tmp_path, capsys):
    skip = train(load_run_config(RUN + ["--train-iters", "3"] + SPIKES + ["--spike-action", "skip",
                                                                           "--inject-fault", "loss-spike@2"]))
    out = capsys.readouterr().out
    assert "iteration 2: a loss spike (loss " in out and "its update is not applied (--spike-action skip)" in out
    assert skip["losses"][1] > 100 * skip["losses"][0]
    rollback = RUN + ["--train-iters", "3", "--save", str(tmp_path / "ckpt"), "--spike-action", "rollback"] + SPIKES
    assert main(rollback + ["--inject-fault", "loss-spike@2"]) == 0
    out = capsys.readouterr().out
    assert "has no checkpoint in --save" in out and "the step is skipped instead" in out
    assert _train_state(tmp_path / "ckpt" / "iter_0000003")["extra"]["skipped_total"] == 1
    assert main(rollback + ["--max-rollbacks", "0", "--inject-fault", "loss-spike@2",
                            "--save", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(--max-rollbacks 0): stopping" in err


def test_a_nan_loss_is_recomputed_then_skipped_and_a_transient_one_named(capsys):
    history = train(load_run_config(RUN + ["--train-iters", "3", "--inject-fault", "nan@2", "nan-transient@3"]))
    out = capsys.readouterr().out
    assert "iteration 2: inf/NaN loss or gradients (not finite: rank 0 (" in out and "again when recomputed" in out
    assert "iteration 3: a transient fault: inf/NaN loss or gradients (not finite: rank 0 (" in out
    assert "the recomputed step is applied" in out
    assert math.isnan(history["losses"][1]) and math.isfinite(history["losses"][2])


def test_bad_steps_resume_their_record():
    cfg = parse_config(RUN + ["--train-iters", "9", "--iterations-to-skip", "2"])
    kept = {}
    bad = BadSteps(cfg, {"iteration": 5, "rollbacks": 2, "rolled_back_iterations": [7, 8]}, kept)
    assert [i for i in range(1, 10) if bad.skips(i)] == [2, 7, 8]
    assert kept == {"rollbacks": 2, "rolled_back_iterations": [7, 8]}  # the next checkpoint keeps them
