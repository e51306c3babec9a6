"""--log-params-norm, --log-num-zeros-in-grad and --log-throughput: the parameters' norm equals
torch's over the checkpoint saved at that iteration, the zero count equals a count by hand (in one
process and under TP2 and PP2 gloo layouts), and TFLOP/s and MFU appear only with --log-throughput."""

import json

import pytest
import torch

from engine_harness import TINY, global_batches, micro_batches_of, rank_engine, spawn_gloo
from megatron_mellama.checkpoint.convert import StoredModel
from megatron_mellama.checkpoint.layout import checkpoint_dir
from megatron_mellama.config import parse_config
from megatron_mellama.pretrain import load_run_config
from megatron_mellama.training.engine import Engine, StepResult
from megatron_mellama.training.loop import train
from megatron_mellama.training.metrics import MetricsLogger

RUN = ["--model", "tiny", "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
       "--global-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "1", "--eval-iters", "1",
       "--eval-interval", "100", "--log-interval", "1", "--num-workers", "0", "--train-iters", "3"]


def _zeros_by_hand(engine) -> int:
    """Gradient elements equal to zero, counted on the full (unsharded) gradients of this rank's parts."""
    count = 0
    for m in engine.modules:
        for p in m.parameters():
            if p.grad is not None:
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                count += int((grad == 0).sum())
    return count


def _full_params(engine) -> list[torch.Tensor]:
    return list(engine.full_state().values())


@pytest.mark.slow
def test_params_norm_is_the_saved_checkpoints_and_zeros_are_logged(tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    train(load_run_config(RUN + ["--log-params-norm", "--log-num-zeros-in-grad", "--save", str(save),
                                 "--save-interval", "2", "--log-file", str(log)]))
    records = {r["iteration"]: r for r in map(json.loads, log.read_text().splitlines()) if "lm_loss" in r}
    assert sorted(records) == [1, 2, 3]
    for iteration in (2, 3):
        stored = StoredModel(checkpoint_dir(str(save), iteration))
        want = torch.nn.utils.get_total_norm([stored.read(name) for name in stored.shapes]).item()
        assert records[iteration]["params_norm"] == pytest.approx(want, rel=1e-6)
    assert records[2]["params_norm"] != records[3]["params_norm"]  # the weights moved
    # a tiny vocabulary's unseen tokens leave whole embedding rows at zero gradient
    assert all(r["num_zeros"] > 0 and r["num_zeros"] == int(r["num_zeros"]) for r in records.values())
    assert "tflops_per_device" not in records[1] and "mfu" not in records[1]  # no --log-throughput


def test_zero_count_equals_a_count_by_hand():
    cfg = parse_config(TINY + ["--log-num-zeros-in-grad", "--vocab-size", "256"])
    batch = micro_batches_of(global_batches(cfg, 1)[0], cfg, 0, 1)
    counted = Engine(cfg).step(batch).num_zeros
    by_hand = Engine(cfg)  # the same initial weights: the same gradients
    by_hand.compute_gradients(batch)
    assert counted == _zeros_by_hand(by_hand) > 0
    norm = Engine(cfg).params_norm().item()
    assert norm == pytest.approx(torch.nn.utils.get_total_norm(_full_params(by_hand)).item(), rel=1e-6)


def test_no_zero_count_without_the_flag():
    cfg = parse_config(TINY)
    engine = Engine(cfg)
    assert engine.step(micro_batches_of(global_batches(cfg, 1)[0], cfg, 0, 1)).num_zeros is None


LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"]}


def _health_rank(rank: int, world: int, argv: list) -> dict:
    out = {}
    for name, flags in LAYOUTS.items():
        cfg, engine, coords, dp_size = rank_engine(rank, world, argv + flags)
        batch = micro_batches_of(global_batches(cfg, 1)[0], cfg, coords["dp"], dp_size)
        out[name] = dict(zeros=engine.step(batch).num_zeros, params_norm=engine.params_norm().item(),
                         params=engine.full_state())
        # the step above zeroed the gradients: compute them again from the stepped weights to count
        engine.compute_gradients(batch)
        out[name].update(by_hand=_zeros_by_hand(engine), zeros_now=engine._num_zeros.item())
    return out


@pytest.mark.slow
def test_tp2_and_pp2_count_and_norm_over_every_shard_and_stage(tmp_path):
    argv = TINY + ["--log-num-zeros-in-grad", "--vocab-size", "256"]
    ranks = spawn_gloo(_health_rank, 2, (argv,), str(tmp_path))
    one = Engine(parse_config(argv))
    one_batch = micro_batches_of(global_batches(one.cfg, 1)[0], one.cfg, 0, 1)
    one_zeros = one.step(one_batch).num_zeros
    for name in LAYOUTS:
        got = [r[name] for r in ranks]
        # TP ranks hold the same full tensors (count them once); PP stages hold disjoint ones
        by_hand = got[0]["by_hand"] if name == "tp2" else got[0]["by_hand"] + got[1]["by_hand"]
        params = {**got[0]["params"], **got[1]["params"]}
        want_norm = torch.nn.utils.get_total_norm(list(params.values())).item()
        for r in got:
            assert r["zeros_now"] == by_hand, name
            assert r["zeros"] == one_zeros, name  # the first step's count, as one process counts it
            assert r["params_norm"] == pytest.approx(want_norm, rel=1e-5), name


def _log_line(tmp_path, capsys, flags: list) -> tuple[str, dict]:
    cfg = parse_config(["--model", "tiny", "--vocab-size", "128", "--seq-length", "16", "--global-batch-size", "8",
                        "--train-iters", "10", "--log-file", str(tmp_path / "log.jsonl"), *flags])
    logger = MetricsLogger(cfg, rank=0, world_size=1, device="cpu")
    logger.log_train(1, 8, StepResult(2.0, 1.0, False, 1e-4, num_zeros=7.0), 1.0, 1, 0, params_norm=12.5)
    logger.close()
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    return capsys.readouterr().out.splitlines()[0], record


def test_throughput_only_with_the_flag(tmp_path, capsys):
    line, record = _log_line(tmp_path, capsys, [])
    assert "tokens/s: 128" in line and record["tokens_per_sec"] == pytest.approx(128.0)  # always
    assert "TFLOP/s" not in line and "MFU" not in line
    assert "tflops_per_device" not in record and "mfu" not in record
    line, record = _log_line(tmp_path, capsys, ["--log-throughput"])
    assert "tokens/s: 128" in line and "TFLOP/s per device:" in line and "MFU: n/a" in line
    assert record["tflops_per_device"] > 0 and record["mfu"] is None  # no known peak on a CPU


def test_params_norm_and_zeros_in_the_line_and_the_log(tmp_path, capsys):
    line, record = _log_line(tmp_path, capsys, [])
    assert "params norm: 12.500" in line and "num zeros: 7" in line
    assert record["params_norm"] == 12.5 and record["num_zeros"] == 7.0
