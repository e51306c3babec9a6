"""The planner (`parallel/memory_model.py`) predicts the peak the dry run traces, within 10%, on small
shapes of every kind of layout the Me-LLaMA recipes use; the dry run of context-parallel layouts;
and the dry run's own command line.

The shapes are small enough to trace in seconds but keep the proportions that matter: sequence,
width and FFN large beside the vocabulary, so activations and weights dominate as at 13B/70B.
Context-parallel layouts run twice the sequence, so that each rank holds as many tokens as the
others' ranks do."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mellama.config import parse_config
from megatron_mellama.parallel.memory_model import predict_rank
from megatron_mellama.parallel.mesh import ParallelDims
from megatron_mellama.tools import plan_layout
from megatron_mellama.training.dry_run import default_ranks, dry_run
from megatron_mellama.training.memory_trace import GIB

SMALL = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8", "--group-query-attention",
         "--num-query-groups", "4", "--ffn-hidden-size", "1408", "--vocab-size", "512",
         "--max-position-embeddings", "1024", "--seq-length", "1024", "--bf16", "--mock-data", "--train-iters", "1"]
TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
           "--data-parallel-sharding", "optimizer", "--global-batch-size", "16"]
CP2 = ["--context-parallel-size", "2", "--seq-length", "2048", "--max-position-embeddings", "2048"]
ZERO2 = ["--data-parallel-sharding", "optimizer", "--global-batch-size", "16"]

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
    # ZeRO-2 reduces once per step by default; these reduce-scatter every micro-batch
    "tp2 pp2 1f1b every micro-batch": TP2_PP2 + ["--no-reduce-grads-once-per-step"],
    "dp8 zero2 every micro-batch": ["--data-parallel-sharding", "optimizer", "--global-batch-size", "16",
                                    "--no-reduce-grads-once-per-step"],
    "dp8 zero3 once per step": ["--data-parallel-sharding", "full", "--global-batch-size", "16",
                                "--reduce-grads-once-per-step"],
    "cp2 dp4 zero2": CP2 + ZERO2,
    "cp2 dp4 zero2 selective": CP2 + ZERO2 + ["--recompute-granularity", "selective"],
    "cp2 tp2 sp zero2": CP2 + ZERO2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "cp2 dp4 zero3": CP2 + ["--data-parallel-sharding", "full", "--global-batch-size", "16"],
    "cp2 pp2 1f1b": CP2 + ZERO2 + ["--pipeline-model-parallel-size", "2"],
}


@pytest.mark.slow
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


@pytest.mark.slow
def test_sharded_modes_hold_sharded_gradients_and_zero3_holds_fewer_weights():
    """What the fixes of the gradient accumulation and of the compute weights look like in a trace:
    with 8 micro-batches, ZeRO-2 reducing every micro-batch and ZeRO-3 (by default) hold 1/8 of the
    fp32 gradients; DDP and ZeRO-2 by default (once per step) all of them."""
    modes = {"none": ["--data-parallel-sharding", "none"], "optimizer": ["--data-parallel-sharding", "optimizer"],
             "optimizer every": ["--data-parallel-sharding", "optimizer", "--no-reduce-grads-once-per-step"],
             "full": ["--data-parallel-sharding", "full"]}
    peaks = {}
    for mode, flags in modes.items():
        cfg = parse_config(SMALL + flags + ["--global-batch-size", "64"], world_size=8)
        peaks[mode] = dry_run(cfg, progress=lambda line: None)[0].peak
    full_grads = peaks["none"].by_kind["gradients"]
    assert peaks["optimizer every"].by_kind["gradients"] == pytest.approx(full_grads / 8, rel=0.05)
    assert peaks["full"].by_kind["gradients"] == pytest.approx(full_grads / 8, rel=0.05)
    assert peaks["optimizer"].by_kind["gradients"] == pytest.approx(full_grads, rel=0.05)
    # ZeRO-3 gathers a layer at a time; ZeRO-2 and DDP keep every bf16 weight
    assert peaks["full"].by_kind["gathered"] < 0.7 * peaks["optimizer"].by_kind["gathered"]

    def scatters(mode):  # the communication is counted by collective and group
        comm = peaks[mode].communication
        return sum(v["calls"] for k, v in comm.items() if k.startswith("reduce-scatter dp")), comm

    # 5 FSDP units (4 layers and the root): once per step by default, every micro-batch when asked
    assert scatters("optimizer")[0] == 5, scatters("optimizer")
    assert scatters("optimizer every")[0] >= 8 * 4 and scatters("full")[0] >= 8 * 4, scatters("optimizer every")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--tensor-model-parallel-size", "2", "--sequence-parallel"]],
                         ids=["cp2", "cp2-tp2-sp"])
def test_context_parallel_dry_run_counts_the_key_value_all_gather(flags):
    """Every layer all-gathers keys and values over the cp group, and its backward reduce-scatters
    their gradients: 2 of each per layer and micro-batch, of the whole sequence's keys."""
    cfg = parse_config(SMALL + CP2 + ZERO2 + flags, world_size=8)
    (trace,) = dry_run(cfg, progress=lambda line: None)
    comm, layers, micro_batches = trace.peak.communication, 4, cfg.num_microbatches
    tp = cfg.parallel.tensor_model_parallel_size
    for name in ("all-gather cp", "reduce-scatter cp"):
        assert comm[name]["calls"] == 2 * layers * micro_batches, comm
    # bf16 keys of 4 of 8 heads of 64 over the whole sequence, each call
    whole = 2048 * (4 // tp) * 64 * 2
    assert comm["all-gather cp"]["bytes"] == 2 * layers * micro_batches * whole
    assert trace.coordinates == dict(pp=0, dp=0, cp=0, tp=0)


def test_default_ranks_skip_the_context_parallel_ranks():
    dims = ParallelDims(pp=2, dp_replicate=2, dp_shard=1, tp=2, cp=2)
    first, last = default_ranks(dims)
    assert first == 0 and dims.coordinates(last) == dict(pp=1, dp=0, cp=0, tp=0)


@pytest.mark.slow
def test_pretrain_dry_run_prints_each_rank_and_fits_line():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_mellama.pretrain", *SMALL, *TP2_PP2, "--dry-run", "--world-size", "8",
         "--gpu-memory-gb", "1"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tracing rank 0 of 8" in out.stdout and "tracing rank 4 of 8" in out.stdout
    assert "rank 4 communication per step:" in out.stdout and "send pp" in out.stdout
    assert "on a 1 GiB card: fits" in out.stdout


@pytest.mark.slow
def test_pretrain_dry_run_of_cp2_tp2_pp2_names_the_cp_collectives():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_mellama.pretrain", *SMALL, *TP2_PP2, *CP2, "--dry-run", "--world-size", "16"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tracing rank 0 of 16" in out.stdout and "tracing rank 8 of 16" in out.stdout
    assert "x CP 2 (16 GPUs)" in out.stdout and "context-parallel rank 0" in out.stdout
    for rank in (0, 8):
        line = next(x for x in out.stdout.splitlines() if x.startswith(f"rank {rank} communication"))
        assert "all-gather cp" in line and "reduce-scatter cp" in line and "send pp" in line, line


@pytest.mark.slow
def test_dry_run_flags_need_dry_run():
    out = subprocess.run([sys.executable, "-m", "megatron_mellama.pretrain", *SMALL, "--world-size", "8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--world-size and --dry-run-ranks are for --dry-run" in out.stderr


# the Me-LLaMA recipes as written (layout, sharding, --reduce-grads-once-per-step, micro-batch,
# precision), each at a shape small enough to trace in seconds: (recipe, its TP x PP x CP, shape flags)
_SMALL_MODEL = ["--hidden-size", "512", "--num-attention-heads", "8", "--ffn-hidden-size", "1408",
                "--vocab-size", "512"]
RECIPES = {
    "13b": ("me_llama_13b.yaml", (4, 1, 1), _SMALL_MODEL + ["--num-layers", "4", "--seq-length", "1024",
                                                            "--max-position-embeddings", "1024"]),
    # TP 8 needs 8 key/value heads: the 70B preset's 8 groups
    "70b": ("me_llama_70b.yaml", (8, 4, 1), _SMALL_MODEL + ["--num-layers", "8", "--seq-length", "1024",
                                                            "--max-position-embeddings", "1024"]),
    "13b long": ("me_llama_13b_long.yaml", (4, 1, 2), _SMALL_MODEL + ["--num-layers", "4", "--seq-length", "2048",
                                                                      "--max-position-embeddings", "2048"]),
}
RECIPE_DIR = Path(__file__).resolve().parents[1] / "examples" / "me_llama"


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_the_planner_holds_to_the_dry_run_of_each_recipe_as_written(name, capsys):
    """`plan_layout --config RECIPE` lists, for the recipe's own layout, what `pretrain --config
    RECIPE --dry-run` traces (both at DP 2, on a small model)."""
    recipe, (tp, pp, cp), shape = RECIPES[name]
    argv, world = ["--config", str(RECIPE_DIR / recipe)] + shape, tp * pp * cp * 2
    cfg = parse_config(argv, world_size=world)
    assert cfg.parallel.data_parallel_sharding == "optimizer"
    assert plan_layout.main(argv + ["--num-gpus", str(world), "--gpu-memory-gb", "80", "--top", "0", "--json"]) == 0
    out = capsys.readouterr().out
    (row,) = [r for r in json.loads(out) if (r["tp"], r["pp"], r.get("cp", 1)) == (tp, pp, cp)]
    traced = max(t.peak.total for t in dry_run(cfg, progress=lambda line: None))
    assert row["total_gb"] * GIB == pytest.approx(traced, rel=0.10), (name, row["total_gb"], traced / GIB)
    if cfg.parallel.reduce_grads_once_per_step:  # whole fp32 gradients until the step's reduce-scatter
        assert row["grads_gb"] > row["weights_gb"] * 1.5, row


@pytest.mark.parametrize("extra", [["--kernel-backend", "te"], ["--reset-position-ids", "--reset-attention-mask"]],
                         ids=["te attention", "packed documents"])
def test_selective_recompute_counts_the_q_and_k_a_kept_attention_call_holds(extra):
    """Selective recompute keeps TE's and flex attention's calls whole (`parallel/recompute.py`),
    with their own q and k after RoPE: the planner adds them per layer, and nothing without
    selective recompute or under context parallelism (whose attention the policy sees)."""
    base = SMALL + TP2_PP2 + ["--recompute-granularity", "selective"]

    def activations(flags):
        return predict_rank(parse_config(flags, world_size=8), 0).parts["activations"]

    m = parse_config(base, world_size=8).model
    tp, r = 2, m.num_query_groups / m.num_attention_heads
    # stage 0 of 1F1B over PP 2 holds 2 micro-batches of its 2 layers; bf16 q (1) and k (r) over TP
    per_layer = 1 * 1024 * m.hidden_size * 2 * (1 + r) / tp
    assert activations(base + extra) - activations(base) == pytest.approx(2 * 2 * per_layer)
    no_recompute = SMALL + TP2_PP2
    assert activations(no_recompute + extra) == activations(no_recompute)
