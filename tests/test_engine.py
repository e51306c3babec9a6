"""Every parallel layout gives the losses, grad norms and parameters of one process (gloo on CPU)."""

import math

import pytest
import torch

from engine_harness import TINY, assert_matches, reference, rel as _rel, run_distributed, run_layouts_by_world
from megatron_mellama.config import ConfigError, parse_config
from megatron_mellama.config.validate import ZERO_BUBBLE_TORCH, torch_at_least
from megatron_mellama.parallel.mesh import ParallelDims
from megatron_mellama.training.engine import Engine

STEPS = 3
LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2-1f1b": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp2-interleaved": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "pp2-zero-bubble": (2, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zero-bubble"]),
    "dp2-ddp": (2, ["--data-parallel-sharding", "none"]),
    "dp2-fsdp": (2, ["--data-parallel-sharding", "full"]),
    "tp2-pp2-dp2": (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                        "--sequence-parallel", "--data-parallel-sharding", "full"]),
}


@pytest.fixture(scope="module")
def fp32_reference():
    return reference(TINY, STEPS)


def _runs_here(name: str) -> bool:
    return "zero-bubble" not in name or torch_at_least(ZERO_BUBBLE_TORCH)


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """Every layout below, from one launch per world size: {name: every rank's results}."""
    return run_layouts_by_world({name: (world, TINY + flags) for name, (world, flags) in LAYOUTS.items()
                                 if _runs_here(name)}, STEPS, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(not _runs_here(n), reason=f"zero-bubble needs torch {ZERO_BUBBLE_TORCH}"))
    for n in LAYOUTS])
def test_layout_equals_one_process(name, fp32_reference, layout_runs):
    results = layout_runs[name]
    # fp32 rounding: reductions in another order (1e-5 relative, the project's bar)
    assert_matches(results, fp32_reference, rtol=1e-5)
    # the loss moved: three real optimizer steps happened
    assert fp32_reference["losses"][0] != fp32_reference["losses"][-1]


@pytest.mark.slow
def test_bf16_layout_within_bf16_tolerance(tmp_path):
    ref = reference(TINY + ["--bf16"], STEPS)
    fp32 = reference(TINY, STEPS)
    results = run_distributed(TINY + ["--bf16", "--tensor-model-parallel-size", "2"], 2, STEPS, str(tmp_path))
    for r in results:
        for got, want in zip(r["losses"], ref["losses"]):
            assert _rel(got, want) < 1e-2
    # bf16 compute, fp32 master weights: close to the fp32 run, but not bit-identical
    assert all(_rel(a, b) < 2e-2 for a, b in zip(ref["losses"], fp32["losses"]))
    assert all(p.dtype == torch.float32 for p in ref["params"].values())


def test_single_process_step_reduces_loss_on_a_repeated_batch():
    cfg = parse_config(TINY)
    engine = Engine(cfg)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 128, (8, 17), generator=g)
    micro = [dict(tokens=data[i:i + 2, :-1], labels=data[i:i + 2, 1:], loss_mask=torch.ones(2, 16))
             for i in range(0, 8, 2)]
    losses = [engine.step(micro).loss for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1
    assert abs(losses[0] - math.log(128)) < 0.3


def test_nonfinite_gradients_skip_the_step():
    cfg = parse_config(TINY)
    engine = Engine(cfg)
    before = {k: v.clone() for k, v in engine.full_state().items()}
    data = torch.randint(0, 128, (8, 17))
    micro = [dict(tokens=data[i:i + 2, :-1], labels=data[i:i + 2, 1:], loss_mask=torch.ones(2, 16))
             for i in range(0, 8, 2)]
    with torch.no_grad():
        engine.modules[0].layers["0"].mlp.up_proj.weight[0, 0] = float("nan")
    result = engine.step(micro)
    assert result.skipped and not math.isfinite(result.grad_norm)
    after = engine.full_state()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize("flags,world,needle", [
    (["--tensor-model-parallel-size", "2"], 3, "--tensor-model-parallel-size"),
    (["--pipeline-model-parallel-size", "3"], 3, "--pipeline-model-parallel-size"),
    (["--tensor-model-parallel-size", "4"], 4, "--num-query-groups"),
    (["--data-parallel-sharding", "full", "--data-parallel-replicate-size", "3"], 4, "--data-parallel-replicate-size"),
])
def test_invalid_layouts_are_refused_with_the_flag(flags, world, needle):
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        parse_config(TINY + flags, world_size=world)


def test_parallel_dims_from_config():
    cfg = parse_config(TINY + ["--tensor-model-parallel-size", "2", "--data-parallel-sharding", "full",
                               "--data-parallel-replicate-size", "2", "--global-batch-size", "8"], world_size=8)
    dims = ParallelDims.from_config(cfg, 8)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (1, 2, 2, 2, 4)
    assert dims.coordinates(5) == dict(pp=0, dp=2, cp=0, tp=1)
