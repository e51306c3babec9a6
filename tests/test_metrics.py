"""MetricsLogger: console line, TensorBoard tags/values/steps (read back from the event files) and
the JSONL file; only global rank 0 writes."""

import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_mellama.config import parse_config
from megatron_mellama.model.flops import training_flops_per_token
from megatron_mellama.training.engine import StepResult
from megatron_mellama.training.metrics import MetricsLogger, perplexity

GLOBAL_BATCH, SEQ = 8, 16
TRAIN_KEYS = {"iteration", "consumed_samples", "lm_loss", "lr", "grad_norm", "skipped", "skipped_total",
              "tokens_per_sec", "tflops_per_device", "mfu", "memory_gib", "iteration_time_s", "time"}


def _cfg(tmp_path, tensorboard=True, log_file=True):
    argv = ["--model", "tiny", "--vocab-size", "128", "--seq-length", str(SEQ),
            "--global-batch-size", str(GLOBAL_BATCH), "--train-iters", "1000", "--log-throughput"]
    if tensorboard:
        argv += ["--tensorboard-dir", str(tmp_path / "tb")]
    if log_file:
        argv += ["--log-file", str(tmp_path / "metrics.jsonl")]
    return parse_config(argv)


def _run(cfg, rank=0, world_size=2):
    """Three logged iterations (one skipped), then an evaluation over the blend and two domains."""
    logger = MetricsLogger(cfg, rank=rank, world_size=world_size, device="cpu")
    metrics = []
    for i, (loss, skipped) in enumerate([(3.5, False), (float("nan"), True), (2.5, False)]):
        iteration = 10 * (i + 1)
        result = StepResult(loss=loss, grad_norm=1.0 + i, skipped=skipped, lr=1e-4 * (i + 1))
        metrics.append(logger.log_train(iteration, iteration * GLOBAL_BATCH, result, elapsed_seconds_since_last_log=2.0,
                                        steps_since_last_log=10, skipped_total=int(i >= 1), loss_scale=None))
    logger.log_eval(30, 30 * GLOBAL_BATCH, {"all": 2.0, "bio": 1.5, "clin": 25.0})
    logger.close()
    return metrics


def _scalars(tb_dir):
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_tags_values_and_steps(tmp_path):
    cfg = _cfg(tmp_path)
    metrics = _run(cfg)
    s = _scalars(tmp_path / "tb")

    for tag in ("lm loss", "learning-rate", "grad-norm", "batch-size", "iteration-time", "throughput",
                "tokens-per-sec", "memory", "lm loss vs samples", "learning-rate vs samples"):
        assert tag in s, tag
    assert "mfu" not in s  # no known peak on CPU
    assert "loss-scale" not in s  # only logged when a loss scale is given
    assert [step for step, _ in s["lm loss"]] == [10, 20, 30]
    assert s["lm loss"][0][1] == pytest.approx(3.5) and math.isnan(s["lm loss"][1][1])
    assert [step for step, _ in s["lm loss vs samples"]] == [80, 160, 240]
    assert [v for _, v in s["learning-rate"]] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert [v for _, v in s["grad-norm"]] == pytest.approx([1.0, 2.0, 3.0])
    assert s["batch-size"][0][1] == GLOBAL_BATCH
    assert s["iteration-time"][0][1] == pytest.approx(0.2)

    tokens_per_sec = GLOBAL_BATCH * SEQ * 10 / 2.0
    assert s["tokens-per-sec"][0][1] == pytest.approx(tokens_per_sec)
    tflops = tokens_per_sec * training_flops_per_token(cfg.model, SEQ) / 2 / 1e12  # two devices
    assert s["throughput"][0][1] == pytest.approx(tflops, rel=1e-6)
    assert metrics[0]["tflops_per_device"] == pytest.approx(tflops)

    assert s["lm loss validation"] == [(30, pytest.approx(2.0))]
    assert s["lm loss validation ppl"] == [(30, pytest.approx(math.exp(2.0), rel=1e-6))]
    assert s["lm loss validation/bio"] == [(30, pytest.approx(1.5))]
    assert s["lm loss validation ppl/bio"] == [(30, pytest.approx(math.exp(1.5), rel=1e-6))]
    assert s["lm loss validation ppl/clin"] == [(30, pytest.approx(math.exp(20.0), rel=1e-6))]  # capped
    assert s["lm loss validation vs samples"] == [(240, pytest.approx(2.0))]
    assert s["lm loss validation/bio vs samples"] == [(240, pytest.approx(1.5))]


@pytest.mark.slow
def test_jsonl_has_one_object_per_log_and_eval(tmp_path):
    _run(_cfg(tmp_path))
    # strict parsing: a NaN loss must not produce invalid JSON
    lines = [json.loads(line, parse_constant=pytest.fail)
             for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    train, evaluation = lines[:3], lines[3]
    for record in train:
        assert TRAIN_KEYS <= set(record)
    assert [r["iteration"] for r in train] == [10, 20, 30]
    assert [r["consumed_samples"] for r in train] == [80, 160, 240]
    assert train[0]["lm_loss"] == 3.5 and train[1]["lm_loss"] is None and train[1]["skipped"] is True
    assert [r["skipped_total"] for r in train] == [0, 1, 1]
    assert train[0]["mfu"] is None and train[0]["memory_gib"] > 0
    assert train[0]["tokens_per_sec"] == pytest.approx(GLOBAL_BATCH * SEQ * 10 / 2.0)
    assert evaluation["iteration"] == 30 and evaluation["consumed_samples"] == 240
    assert evaluation["eval"]["all"] == {"lm_loss": 2.0, "ppl": pytest.approx(math.exp(2.0))}
    assert set(evaluation["eval"]) == {"all", "bio", "clin"}


def test_log_file_appends_across_loggers(tmp_path):
    _run(_cfg(tmp_path, tensorboard=False))
    _run(_cfg(tmp_path, tensorboard=False))  # a resumed run adds to the same file
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 8
    assert not (tmp_path / "tb").exists()


def test_console_line_has_megatron_fields(tmp_path, capsys):
    _run(_cfg(tmp_path, tensorboard=False, log_file=False))
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith(" iteration ") and "10/" in first and "1000" in first
    for field in ("consumed samples:", "elapsed time per iteration (ms): 200.0", "learning rate: 1.000000E-04",
                  "lm loss: 3.500000E+00", "grad norm: 1.000", "number of skipped iterations:", "tokens/s: 640",
                  "TFLOP/s per device:", "MFU: n/a", "memory (GiB): max rss"):
        assert field in first, field
    assert "validation loss at iteration 30" in out
    assert "lm loss validation: 2.000000E+00" in out and "lm loss validation/bio: 1.500000E+00" in out


def test_loss_scale_is_logged_when_given(tmp_path):
    cfg = _cfg(tmp_path, log_file=False)
    logger = MetricsLogger(cfg, rank=0, world_size=1, device="cpu")
    logger.log_train(5, 40, StepResult(2.0, 1.0, False, 1e-4), 1.0, 5, 0, loss_scale=65536.0)
    logger.close()
    assert _scalars(tmp_path / "tb")["loss-scale"] == [(5, 65536.0)]


def test_other_ranks_write_nothing(tmp_path, capsys):
    metrics = _run(_cfg(tmp_path), rank=1)
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "tb").exists()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert metrics[0]["tokens_per_sec"] == pytest.approx(GLOBAL_BATCH * SEQ * 10 / 2.0)  # computed anyway


def test_perplexity_is_capped():
    assert perplexity(1.0) == pytest.approx(math.e)
    assert perplexity(1e6) == pytest.approx(math.exp(20.0))
