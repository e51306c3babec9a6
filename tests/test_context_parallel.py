"""Context parallelism: CP2 alone and composed with TP2 + SP, PP2 and FSDP equals one process, with and
without packed-document masking; a rank whose tokens are all masked stays finite; the layout and
its checks; checkpoints move between CP2 and CP1."""

import math

import pytest
import torch

from checkpoint_harness import train_segment, train_segment_distributed
from engine_harness import TINY, assert_matches, reference, rel as _rel, run_distributed
from megatron_mellama.config import ConfigError, parse_config
from megatron_mellama.parallel.context import chunk_positions
from megatron_mellama.parallel.mesh import ParallelDims

STEPS = 3
PACKED = ["--seq-length", "32", "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
CP2 = ["--context-parallel-size", "2"]
LAYOUTS = {
    "cp2": (2, CP2),
    "cp2-tp2-sp": (4, CP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "cp2-pp2": (4, CP2 + ["--pipeline-model-parallel-size", "2"]),
    "cp2-dp2-fsdp": (4, CP2 + ["--data-parallel-sharding", "full"]),
}


@pytest.fixture(scope="module")
def references():
    return {packed: reference(TINY + (PACKED if packed else []), STEPS) for packed in (False, True)}


# every layout with packed documents (the masks and positions cross the cp split); the plain causal
# mask with the layouts that change attention itself
CASES = [(name, True) for name in LAYOUTS] + [("cp2", False), ("cp2-tp2-sp", False)]


@pytest.mark.parametrize("name,packed", CASES,
                         ids=[f"{n}-{'packed-documents' if p else 'causal'}" for n, p in CASES])
def test_layout_equals_one_process(name, packed, references, tmp_path):
    world, flags = LAYOUTS[name]
    argv = TINY + (PACKED if packed else []) + flags
    assert_matches(run_distributed(argv, world, STEPS, str(tmp_path)), references[packed], 1e-5)


@pytest.mark.parametrize("flags", [["--recompute-granularity", "selective"], ["--compile"]],
                         ids=["selective-recompute", "compile"])
def test_cp2_composes_with_recompute_and_compile(flags, references, tmp_path):
    assert_matches(run_distributed(TINY + CP2 + flags, 2, STEPS, str(tmp_path)), references[False], 1e-5)


def _fused_lower_right_rank(rank, world, argv, steps):
    from engine_harness import _engine_rank

    from megatron_mellama.parallel import context

    # the CUDA path (one SDPA call per chunk with a lower-right causal mask), here on the CPU
    context.FUSED_LOWER_RIGHT_DEVICES = ("cpu",)
    return _engine_rank(rank, world, argv, steps)


def test_the_fused_lower_right_path_equals_one_process(references, tmp_path):
    from engine_harness import spawn_gloo

    results = spawn_gloo(_fused_lower_right_rank, 2, (TINY + CP2, STEPS), str(tmp_path))
    assert_matches(results, references[False], 1e-5)


def test_the_layout_pairs_early_and_late_chunks():
    assert chunk_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert chunk_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    held = torch.cat([chunk_positions(24, 3, r) for r in range(3)])
    assert sorted(held.tolist()) == list(range(24))
    dims = ParallelDims.from_config(parse_config(TINY + CP2 + ["--tensor-model-parallel-size", "2"], world_size=8), 8)
    assert (dims.dp, dims.cp, dims.tp) == (2, 2, 2)
    # tensor parallel innermost, then context parallel, then data parallel (Megatron-LM's order)
    assert [dims.coordinates(r) for r in (1, 2, 4)] == [dict(pp=0, dp=0, cp=0, tp=1), dict(pp=0, dp=0, cp=1, tp=0),
                                                         dict(pp=0, dp=1, cp=0, tp=0)]


@pytest.mark.parametrize("flags,message", [
    (["--seq-length", "18"], r"--seq-length 18 must be divisible by 2 x 2"),
    (["--seq-length", "12", "--num-query-groups", "4", "--tensor-model-parallel-size", "4", "--sequence-parallel"],
     r"--sequence-parallel: --seq-length 12 must be divisible by --tensor-model-parallel-size 4 x "
     r"--context-parallel-size 2"),
])
def test_bad_layouts_fail_with_one_line(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TINY + CP2 + flags, world_size=8)
    with pytest.raises(ConfigError, match=r"world size 5 .* multiple of .* x --context-parallel-size 2"):
        parse_config(TINY + CP2, world_size=5)


def _all_masked_on_rank_1(rank, world, argv):
    from engine_harness import global_batches, micro_batches_of, run_steps

    from megatron_mellama.training.engine import Engine

    cfg = parse_config(argv, world_size=world)
    dims = ParallelDims.from_config(cfg, world)
    engine = Engine(cfg, dims.build_mesh("cpu"))
    batch = global_batches(cfg, 1)[0]
    batch["loss_mask"][:, 4:12] = 0  # every token rank 1 holds (chunks 1 and 2 of 4)
    result = engine.step(micro_batches_of(batch, cfg, 0, 1))
    grads_finite = all(torch.isfinite(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).all()
                       for m in engine.modules for p in m.parameters() if p.grad is not None)
    del run_steps
    return dict(loss=result.loss, grad_norm=result.grad_norm, grads_finite=grads_finite)


def test_a_rank_whose_tokens_are_all_masked_stays_finite(tmp_path):
    from megatron_mellama.training.engine import Engine
    from engine_harness import global_batches, micro_batches_of, spawn_gloo

    results = spawn_gloo(_all_masked_on_rank_1, 2, (TINY + CP2,), str(tmp_path))
    cfg = parse_config(TINY)
    batch = global_batches(cfg, 1)[0]
    batch["loss_mask"][:, 4:12] = 0
    want = Engine(cfg).step(micro_batches_of(batch, cfg, 0, 1))
    for r in results:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grads_finite"]
        assert _rel(r["loss"], want.loss) <= 1e-5 and _rel(r["grad_norm"], want.grad_norm) <= 1e-5


def test_checkpoints_move_between_cp2_and_one_process(tmp_path):
    base = TINY + ["--train-iters", "6"]
    whole = train_segment(base, 0, 6, save=False)
    save = str(tmp_path / "cp2")
    first = train_segment_distributed(base + CP2 + ["--save", save], 2, 0, 3, True, str(tmp_path))
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(first[0]["losses"], whole["losses"][:3]))
    second = train_segment(base + ["--load", save], 3, 6, save=False)
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(second["losses"], whole["losses"][3:]))
    # and back: a one-process checkpoint resumed under CP2
    one = str(tmp_path / "one")
    train_segment(base + ["--save", one], 0, 3, save=True)
    back = train_segment_distributed(base + CP2 + ["--load", one], 2, 3, 6, False, str(tmp_path))
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(back[0]["losses"], whole["losses"][3:]))
