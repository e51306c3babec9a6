"""The planner (`parallel/memory_model.py`) predicts the peak the dry run traces, within 10%, on small
shapes of every kind of layout the Me-LLaMA recipes use; and the dry run's own command line.

The shapes are small enough to trace in seconds but keep the proportions that matter: sequence,
width and FFN large beside the vocabulary, so activations and weights dominate as at 13B/70B."""

import subprocess
import sys

import pytest

from megatron_mellama.config import parse_config
from megatron_mellama.parallel.memory_model import predict_rank
from megatron_mellama.training.dry_run import dry_run

SMALL = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8", "--group-query-attention",
         "--num-query-groups", "4", "--ffn-hidden-size", "1408", "--vocab-size", "512",
         "--max-position-embeddings", "1024", "--seq-length", "1024", "--bf16", "--mock-data", "--train-iters", "1"]
TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
           "--data-parallel-sharding", "optimizer", "--global-batch-size", "16"]

LAYOUTS = {
    "dp8 ddp": ["--data-parallel-sharding", "none", "--global-batch-size", "16"],
    "dp8 zero2": ["--data-parallel-sharding", "optimizer", "--global-batch-size", "16"],
    "dp8 zero3": ["--data-parallel-sharding", "full", "--global-batch-size", "16"],
    "tp2 sp zero2 mb2": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--data-parallel-sharding",
                         "optimizer", "--micro-batch-size", "2", "--global-batch-size", "16"],
    "tp2 pp2 1f1b": TP2_PP2,
    "tp2 pp2 1f1b selective": TP2_PP2 + ["--recompute-granularity", "selective"],
    "tp2 pp2 1f1b full": TP2_PP2 + ["--recompute-granularity", "full"],
    "tp2 pp2 interleaved": TP2_PP2 + ["--num-layers-per-virtual-pipeline-stage", "1"],
    "tp2 pp2 1f1b once per step": TP2_PP2 + ["--reduce-grads-once-per-step"],
    "dp8 zero2 once per step": ["--data-parallel-sharding", "optimizer", "--global-batch-size", "16",
                                "--reduce-grads-once-per-step"],
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_planner_is_within_ten_percent_of_the_traced_peak(name):
    cfg = parse_config(SMALL + LAYOUTS[name], world_size=8)
    traces = dry_run(cfg, progress=lambda line: None)
    assert len(traces) == (2 if cfg.parallel.pipeline_model_parallel_size > 1 else 1)
    for trace in traces:
        predicted = predict_rank(cfg, trace.rank).total_bytes
        assert trace.peak.total > 0
        assert predicted == pytest.approx(trace.peak.total, rel=0.10), (
            name, trace.rank, predicted / 2 ** 20, trace.peak.total / 2 ** 20, trace.peak.by_kind)


def test_sharded_modes_hold_sharded_gradients_and_zero3_holds_fewer_weights():
    """What the fixes of the gradient accumulation and of the compute weights look like in a trace:
    with 8 micro-batches, ZeRO-2 and ZeRO-3 hold 1/8 of the fp32 gradients; DDP all of them."""
    peaks = {}
    for mode in ("none", "optimizer", "full"):
        cfg = parse_config(SMALL + ["--data-parallel-sharding", mode, "--global-batch-size", "64"], world_size=8)
        peaks[mode] = dry_run(cfg, progress=lambda line: None)[0].peak
    full_grads = peaks["none"].by_kind["gradients"]
    assert peaks["optimizer"].by_kind["gradients"] == pytest.approx(full_grads / 8, rel=0.05)
    assert peaks["full"].by_kind["gradients"] == pytest.approx(full_grads / 8, rel=0.05)
    # ZeRO-3 gathers a layer at a time; ZeRO-2 and DDP keep every bf16 weight
    assert peaks["full"].by_kind["gathered"] < 0.7 * peaks["optimizer"].by_kind["gathered"]
    # the communication is counted by collective and group: ZeRO reduce-scatters every micro-batch
    comm = peaks["optimizer"].communication
    assert sum(v["calls"] for k, v in comm.items() if k.startswith("reduce-scatter dp")) >= 8 * 4, comm


def test_pretrain_dry_run_prints_each_rank_and_fits_line():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_mellama.pretrain", *SMALL, *TP2_PP2, "--dry-run", "--world-size", "8",
         "--gpu-memory-gb", "1"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tracing rank 0 of 8" in out.stdout and "tracing rank 4 of 8" in out.stdout
    assert "rank 4 communication per step:" in out.stdout and "send pp" in out.stdout
    assert "on a 1 GiB card: fits" in out.stdout


def test_dry_run_flags_need_dry_run():
    out = subprocess.run([sys.executable, "-m", "megatron_mellama.pretrain", *SMALL, "--world-size", "8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--world-size and --dry-run-ranks are for --dry-run" in out.stderr
