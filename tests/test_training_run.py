"""The whole pretraining run: resume is exact, SIGTERM saves and exits 0, metrics land in
TensorBoard and the JSON-lines file, too many skipped steps stop the run."""

import dataclasses
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_mellama.pretrain import load_run_config, main
from megatron_mellama.training.loop import train

REPO = Path(__file__).resolve().parents[1]
RUN = ["--model", "tiny", "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
       "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
       "--lr-warmup-iters", "2", "--eval-iters", "1", "--eval-interval", "3", "--log-interval", "1",
       "--num-workers", "0"]


@pytest.mark.slow
def test_three_plus_resume_plus_three_equals_six_bitwise(tmp_path):
    whole = train(load_run_config(RUN + ["--train-iters", "6"]))
    save = str(tmp_path / "ckpt")
    first = train(load_run_config(RUN + ["--train-iters", "6", "--save", save, "--save-interval", "100",
                                         "--exit-interval", "3"]))
    assert first["iteration"] == 3 and (tmp_path / "ckpt" / "latest").read_text().strip() == "3"
    second = train(load_run_config(RUN + ["--train-iters", "6", "--save", save, "--load", save]))
    assert second["start_iteration"] == 3 and second["consumed_samples"] == 24
    assert first["losses"] + second["losses"] == whole["losses"]  # bitwise: same floats
    assert whole["losses"][-1] < whole["losses"][0]


@pytest.mark.slow
def test_finetune_starts_at_iteration_zero(tmp_path):
    save = str(tmp_path / "ckpt")
    train(load_run_config(RUN + ["--train-iters", "4", "--save", save]))
    run = train(load_run_config(RUN + ["--train-iters", "3", "--load", save, "--finetune"]))
    assert run["start_iteration"] == 0 and len(run["losses"]) == 3
    fresh = train(load_run_config(RUN + ["--train-iters", "3"]))
    assert run["losses"][0] < fresh["losses"][0]  # it started from the trained weights


@pytest.mark.slow
def test_metrics_reach_tensorboard_and_the_log_file(tmp_path):
    tb, log = tmp_path / "tb", tmp_path / "metrics.jsonl"
    train(load_run_config(RUN + ["--train-iters", "3", "--tensorboard-dir", str(tb), "--log-file", str(log)]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "grad-norm", "tokens-per-sec", "lm loss validation"} <= tags
    assert [e.step for e in events.Scalars("lm loss")] == [1, 2, 3]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    train_records = [r for r in records if "lm_loss" in r]
    assert [r["iteration"] for r in train_records] == [1, 2, 3]
    assert train_records[-1]["consumed_samples"] == 12 and any("eval" in r for r in records)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
    save = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_mellama.pretrain", *RUN, "--train-iters", "100000",
                             "--save", str(save), "--eval-interval", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training is under way
        logged = re.match(r"\s*iteration\s+(\d+)/", line)
        if (logged and int(logged.group(1)) >= 5) or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = int((save / "latest").read_text())
    assert saved >= 5 and (save / f"iter_{saved:07d}").is_dir()
    assert "SIGTERM" in out


def test_too_many_skipped_steps_stop_the_run(capsys):
    # an absurd learning rate blows the weights up; inf/NaN steps are skipped, then the run stops
    argv = RUN + ["--train-iters", "50", "--lr", "1e30", "--min-lr", "0", "--max-skipped-steps", "2",
                  "--clip-grad", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--max-skipped-steps" in err and err.count("\n") == 1


def _torchrun(args, nproc, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_mellama.pretrain", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [float(m) for m in re.findall(r"lm loss: ([0-9.E+-]+)", proc.stdout)]


@pytest.mark.slow
def test_resume_under_another_layout_continues_the_same_run(tmp_path):
    """TP2 for 3 iterations, then DP2 (FSDP) from its checkpoint: the losses of an uninterrupted
    single-process run, within fp32 rounding."""
    save = str(tmp_path / "ckpt")
    whole = train(load_run_config(RUN + ["--train-iters", "6"]))["losses"]
    first = _torchrun(RUN + ["--train-iters", "6", "--save", save, "--exit-interval", "3",
                             "--tensor-model-parallel-size", "2"], 2, tmp_path)
    second = _torchrun(RUN + ["--train-iters", "6", "--load", save, "--data-parallel-sharding", "full"], 2, tmp_path)
    assert len(first) == 3 and len(second) == 3
    for got, want in zip(first + second, whole):
        assert abs(got - want) <= 1e-5 * abs(want)


# -- issue 14: a diverged run fails, a finished one says so --------------------------------------

def test_too_many_skipped_steps_stop_the_run_by_default(tmp_path, capsys):
    # no --max-skipped-steps: the default (10) stops the diverged run, before any checkpoint
    save = tmp_path / "ckpt"
    argv = RUN + ["--train-iters", "40", "--lr", "1e30", "--min-lr", "0", "--clip-grad", "0",
                  "--eval-interval", "1000", "--save", str(save), "--save-interval", "1000"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--max-skipped-steps is 10" in err and err.count("\n") == 1
    assert not (save / "latest").exists()


def test_nan_validation_loss_fails_without_saving(tmp_path, capsys, monkeypatch):
    from megatron_mellama.training import engine as engine_module

    monkeypatch.setattr(engine_module.Engine, "evaluate", lambda self, micro_batches: float("nan"))
    save = tmp_path / "ckpt"
    assert main(RUN + ["--train-iters", "6", "--save", str(save), "--save-interval", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "validation loss is not finite at iteration 3" in err and "nan" in err
    assert not (save / "latest").exists() and not list(save.glob("iter_*"))


@pytest.mark.slow
def test_inf_validation_loss_of_one_domain_fails(monkeypatch):
    from megatron_mellama.training.jobs import validation as validation_module
    from megatron_mellama.training.run_control import TrainingStopped

    monkeypatch.setattr(validation_module, "evaluate", lambda *a: {"all": 5.0, "clin": float("inf")})
    try:
        train(load_run_config(RUN + ["--train-iters", "3"]))
    except TrainingStopped as e:
        assert "lm loss validation/clin inf" in str(e) and "lm loss validation 5" not in str(e)
    else:
        raise AssertionError("an inf validation loss must stop the run")


def test_a_short_run_whose_every_step_is_skipped_fails(tmp_path, capsys, monkeypatch):
    from megatron_mellama.training import engine as engine_module

    real = engine_module.Engine.compute_gradients

    def nan_loss(self, micro_batches):
        loss, grad_norm = real(self, micro_batches)
        return loss * float("nan"), grad_norm

    monkeypatch.setattr(engine_module.Engine, "compute_gradients", nan_loss)
    save = tmp_path / "ckpt"
    assert main(RUN + ["--train-iters", "3", "--eval-iters", "0", "--save", str(save)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every one of the 3 iterations of this run was skipped" in err
    assert not (save / "latest").exists()


@pytest.mark.slow
def test_fp16_loss_scale_settling_is_not_a_run_of_skipped_steps():
    # from 2**32 the dynamic scale needs more than 10 overflowing steps to come down: no stop
    run = train(load_run_config(RUN + ["--train-iters", "12", "--fp16", "--eval-interval", "1000",
                                       "--log-interval", "100"]))
    assert run["stopped"] is None and run["iteration"] == 12


@pytest.mark.slow
def test_resuming_a_finished_run_says_it_is_complete(tmp_path, capsys):
    save = tmp_path / "ckpt"
    train(load_run_config(RUN + ["--train-iters", "3", "--save", str(save)]))
    capsys.readouterr()
    for iters in ("3", "2"):
        # the same schedule (a different one is the checkpoint's refusal)
        assert main(RUN + ["--train-iters", iters, "--lr-decay-iters", "3", "--save", str(save),
                           "--load", str(save)]) == 0
        out = capsys.readouterr().out
        done = [line for line in out.splitlines() if "already complete" in line]
        assert len(done) == 1 and "at iteration 3" in done[0] and f"--train-iters {iters}" in done[0]
        assert "lm loss" not in out  # no step, no evaluation
    assert (save / "latest").read_text().strip() == "3" and sorted(p.name for p in save.glob("iter_*")) == ["iter_0000003"]
    run = train(load_run_config(RUN + ["--train-samples", "8", "--lr-warmup-iters", "0", "--load", str(save),
                                       "--no-load-optim"]))
    assert run["losses"] == [] and "--train-samples 8 (2 iterations)" in run["stopped"]


# -- changes on resume: a longer run, another blend ------------------------------------------------
def _logged_lrs(log):
    return [json.loads(line) for line in log.read_text().splitlines() if '"lr"' in line]


def _corpus(root):
    from indexed_corpus import write_domains

    root.mkdir()
    # 20 documents a domain, ~25 samples an epoch: 8 iterations of 8 read bio's second epoch
    return write_domains(root, num_docs=20)


def _blend_run(corpus, tokenizer, blend=(15, 1, 4)):
    path = [t for w, name in zip(blend, ("bio", "clin", "gen")) for t in (str(w), corpus[name])]
    return (["--model", "tiny", "--data-path", *path, "--tokenizer-model", tokenizer, "--split", "90,10,0",
             "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--lr-decay-style", "cosine",
               "--lr-warmup-iters", "2", "--eval-iters", "1", "--eval-interval", "100", "--log-interval", "1",
               "--num-workers", "0"])


@pytest.mark.slow
def test_extending_a_run_continues_exactly(tmp_path, sentencepiece_model, capsys):
    run = _blend_run(_corpus(tmp_path / "data"), sentencepiece_model)
    whole_log = tmp_path / "whole.jsonl"
    whole = train(load_run_config(run + ["--train-iters", "8", "--lr-decay-iters", "8", "--log-file", str(whole_log)]))
    save = str(tmp_path / "ckpt")
    first = train(load_run_config(run + ["--train-iters", "4", "--lr-decay-iters", "8", "--save", save]))
    second = train(load_run_config(run + ["--train-iters", "8", "--lr-decay-iters", "8", "--load", save]))
    assert first["losses"] + second["losses"] == whole["losses"]  # bitwise: the same samples, the same steps

    # without --lr-decay-iters the decay span is --train-iters: extending needs one of Megatron-LM's flags
    short = str(tmp_path / "short")
    train(load_run_config(run + ["--train-iters", "4", "--save", short]))
    capsys.readouterr()
    assert main(run + ["--train-iters", "8", "--load", short]) == 2  # as every bad input
    err = capsys.readouterr().err
    assert "decay_steps: checkpoint 32, now 64" in err and "--override-opt_param-scheduler" in err
    lrs = {}
    for flag in ("--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"):
        log = tmp_path / f"{flag}.jsonl"
        assert train(load_run_config(run + ["--train-iters", "8", "--load", short, flag, "--log-file", str(log)])
                     )["iteration"] == 8
        lrs[flag] = [json.loads(line)["lr"] for line in log.read_text().splitlines() if '"lr"' in line]
    # the new cosine over 64 samples from sample 32 on; the checkpoint's had decayed to --min-lr 0
    assert lrs["--override-opt_param-scheduler"] == [r["lr"] for r in _logged_lrs(whole_log)][4:]
    assert lrs["--use-checkpoint-opt_param-scheduler"] == [0.0] * 4


@pytest.mark.slow
def test_another_blend_on_resume_continues_every_domain(tmp_path, sentencepiece_model, capsys):
    corpus = _corpus(tmp_path / "data")
    save, log = str(tmp_path / "ckpt"), tmp_path / "metrics.jsonl"
    train(load_run_config(_blend_run(corpus, sentencepiece_model) + ["--train-iters", "4", "--save", save]))
    capsys.readouterr()
    resumed = train(load_run_config(_blend_run(corpus, sentencepiece_model, blend=(1, 1, 2)) + [
        "--train-iters", "8", "--load", save, "--save", save, "--override-opt_param-scheduler",
        "--log-file", str(log)]))
    assert resumed["iteration"] == 8
    out = capsys.readouterr().out
    changed = [line for line in out.splitlines() if line.startswith("data blend changed")]
    assert len(changed) == 1 and "at sample 32: bio 0.7500 -> 0.2500; clin 0.0500 -> 0.2500; gen 0.2000 -> " \
                                  "0.5000; each domain continues where it stopped (bio at its sample 24" in changed[0]
    assert re.search(r"consumed samples: +64 \(bio 32, clin 10, gen 22\)", out)
    assert _logged_lrs(log)[-1]["consumed_samples_per_domain"] == {"bio": 32, "clin": 10, "gen": 22}
    state = json.loads((tmp_path / "ckpt" / "iter_0000008" / "train_state.json").read_text())
    order = state["extra"]["data_order"]
    assert [s["start"] for s in order["segments"]] == [0, 32] and sum(order["consumed"].values()) == 64


# -- issue 23: a run that diverges near its end fails, and never saves the diverged weights -------------
def _diverging(save, iters="10", *extra):
    # --lr 1e9: the first update with a non-zero learning rate blows the weights up; every later
    # iteration is skipped (inf/NaN gradients), fewer than --max-skipped-steps (10) of them
    return RUN + ["--train-iters", iters, "--lr", "1e9", "--min-lr", "0", "--eval-interval", "1000",
                  "--save", str(save), *extra]


def test_a_run_that_ends_inside_a_streak_of_skipped_steps_fails(tmp_path, capsys):
    save = tmp_path / "ckpt"
    assert main(_diverging(save, "10", "--save-interval", "5")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the run ended inside a streak of" in err and "skipped iterations" in err, err
    # the periodic save of iteration 5 came inside the streak: put off, never made
    assert not (save / "latest").exists() and not list(save.glob("iter_*"))


def test_a_stop_inside_a_streak_of_skipped_steps_does_not_save(tmp_path, capsys):
    # --exit-interval takes the save path of a stop signal (SIGTERM/SIGUSR1)
    save = tmp_path / "ckpt"
    assert main(_diverging(save, "20", "--exit-interval", "5")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exit interval 5 reached at iteration 5, but iteration 5 was skipped" in err
    assert "holds no checkpoint" in err and not list(save.glob("iter_*"))


@pytest.mark.slow
def test_a_periodic_save_waits_for_the_next_good_iteration(tmp_path, capsys, monkeypatch):
    from megatron_mellama.training import engine as engine_module

    real = engine_module.Engine.step

    def nan_at_three(self, micro_batches, **kw):
        result = real(self, micro_batches, **kw)
        nan_at_three.calls += 1
        return dataclasses.replace(result, skipped=True, loss=float("nan")) if nan_at_three.calls == 3 else result

    nan_at_three.calls = 0
    monkeypatch.setattr(engine_module.Engine, "step", nan_at_three)
    save = tmp_path / "ckpt"
    run = train(load_run_config(RUN + ["--train-iters", "5", "--eval-iters", "0", "--save", str(save),
                                       "--save-interval", "3"]))
    assert run["iteration"] == 5
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000004", "iter_0000005"]
    assert "iteration 3 was skipped" in capsys.readouterr().out


def test_weights_that_are_not_finite_are_never_saved(tmp_path, capsys, monkeypatch):
    import torch

    from megatron_mellama.training import engine as engine_module

    real = engine_module.Engine.step

    def nan_update(self, micro_batches, **kw):
        result = real(self, micro_batches, **kw)  # a finite loss, then an update that leaves a NaN weight
        with torch.no_grad():
            next(self.modules[0].parameters()).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(engine_module.Engine, "step", nan_update)
    save = tmp_path / "ckpt"
    assert main(RUN + ["--train-iters", "3", "--eval-iters", "0", "--save", str(save), "--save-interval", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a weight is not finite after iteration 1" in err
    assert not list(save.glob("iter_*"))


def test_a_nan_downstream_loglikelihood_stops_the_run_before_saving(tmp_path, sentencepiece_model, capsys,
                                                                     monkeypatch):
    import torch

    from megatron_mellama.training import engine as engine_module

    task = tmp_path / "medqa.jsonl"
    task.write_text("".join(json.dumps({"question": f"q{i}?", "choices": ["heart", "blood"], "answer": i % 2}) + "\n"
                            for i in range(3)))
    monkeypatch.setattr(engine_module.Engine, "sequence_loglikelihoods",
                        lambda self, micro_batches: torch.full((4,), float("nan")))
    save = tmp_path / "ckpt"
    argv = [a for a in RUN if a not in ("--vocab-size", "256")]
    assert main(argv + ["--train-iters", "3", "--eval-iters", "0", "--tokenizer-model", sentencepiece_model,
                        "--eval-tasks", f"medqa={task}", "--save", str(save), "--save-interval", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "downstream evaluation at iteration 3: task medqa: " in err, err
    assert "log-likelihood is nan" in err and not list(save.glob("iter_*"))


@pytest.mark.slow
def test_finetune_refuses_a_tokenizer_other_than_the_checkpoint_was_trained_with(tmp_path, sentencepiece_model,
                                                                                  capsys):
    from evaluation_helpers import other_sentencepiece_model, train_tiny_checkpoint

    ckpt = train_tiny_checkpoint(tmp_path / "ckpt", sentencepiece_model)
    other = other_sentencepiece_model(tmp_path, vocab_size=400)  # the same size: no shape tells them apart
    argv = [a for a in RUN if a not in ("--vocab-size", "256")] + [
        "--train-iters", "2", "--lr-warmup-iters", "0", "--eval-iters", "0", "--load", ckpt, "--finetune"]
    capsys.readouterr()
    assert main(argv + ["--tokenizer-model", other]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--tokenizer-model {other} (sha256 " in err and sentencepiece_model in err
    assert main(argv + ["--tokenizer-model", other, "--allow-tokenizer-mismatch"]) == 0
    assert main(argv + ["--tokenizer-model", sentencepiece_model]) == 0
