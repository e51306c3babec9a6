"""The layout planner: its model-state bytes match what the engine allocates, and its command line,
with and without context parallelism."""

import json

import pytest
import torch

from engine_harness import TINY, global_batches, micro_batches_of, spawn_gloo
from megatron_mellama.config import parse_config
from megatron_mellama.parallel.memory_model import estimate, model_state_bytes
from megatron_mellama.tools.plan_layout import main
from megatron_mellama.training.engine import Engine

# pretrain's flags for a bf16, sequence-parallel, ZeRO-2, selective-recompute run
RUN = ["--bf16", "--sequence-parallel", "--data-parallel-sharding", "optimizer", "--recompute-granularity", "selective"]
SHAPE_13B = ["--model", "llama2-13b", "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size",
             "1024", "--gpu-memory-gb", "80", "--num-gpus", "160"]
PLAN_13B = SHAPE_13B + RUN
PLAN_13B_32K = ["--model", "llama2-13b", "--seq-length", "32768", "--max-position-embeddings", "32768",
                "--rotary-base", "500000", "--micro-batch-size", "1", "--global-batch-size", "128",
                "--gpu-memory-gb", "80", "--num-gpus", "64"] + RUN
# a small ZeRO-2 run of 4 micro-batches per rank at DP 2 (TP 1), seconds to plan
SMALL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--ffn-hidden-size", "704",
         "--vocab-size", "512", "--seq-length", "256", "--bf16", "--data-parallel-sharding", "optimizer",
         "--micro-batch-size", "1", "--global-batch-size", "8"]


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def measured_state(engine, cfg, dp_rank=0, dp_size=1) -> dict:
    """This rank's bytes of parameters, gradients (one forward/backward) and optimizer state (one step)."""
    params = [p for m in engine.modules for p in m.parameters()]
    batch = global_batches(cfg, 1)[0]
    micro = micro_batches_of(batch, cfg, dp_rank, dp_size)
    engine._global_batch_loss(micro, train=True)
    grads = _local_bytes(p.grad for p in params)
    engine.optimizer.zero_grad(set_to_none=True)
    engine.step(micro)
    state = [t for s in engine.optimizer.state.values() for t in s.values()
             if torch.is_tensor(t) and t.dim() > 0]  # the scalar `step` counters are negligible
    return dict(weights=_local_bytes(params), grads=grads, optimizer=_local_bytes(state))


def _assert_close(measured: dict, predicted: dict) -> None:
    for key in ("weights", "grads", "optimizer"):
        assert measured[key] == pytest.approx(predicted[key], rel=0.05), key


@pytest.mark.slow
def test_single_process_state_matches_engine():
    cfg = parse_config(TINY)
    measured = measured_state(Engine(cfg), cfg)
    _assert_close(measured, model_state_bytes(cfg.model, 1, 1, 1, "none"))


def _measure_rank(rank: int, world: int) -> dict:
    from megatron_mellama.parallel.mesh import ParallelDims

    out = {}
    for mode in ("optimizer", "full"):
        cfg = parse_config(TINY + ["--data-parallel-sharding", mode], world_size=world)
        dims = ParallelDims.from_config(cfg, world)
        engine = Engine(cfg, dims.build_mesh("cpu"))
        out[mode] = measured_state(engine, cfg, dims.coordinates(rank)["dp"], dims.dp)
    return out


@pytest.mark.slow
def test_sharded_state_matches_engine(tmp_path):
    results = spawn_gloo(_measure_rank, 2, (), str(tmp_path))
    model = parse_config(TINY).model
    for measured in results:
        for mode in ("optimizer", "full"):
            _assert_close(measured[mode], model_state_bytes(model, 1, 1, 2, mode))


def test_13b_plan_has_me_llama_layout(capsys):
    assert main(PLAN_13B + ["--top", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["tp"] * r["pp"] * r["dp"] == 160 for r in rows)
    assert any(r["tp"] in (4, 8) and r["fits"] for r in rows)
    assert all(1024 % r["dp"] == 0 and 40 % r["pp"] == 0 for r in rows)
    fitting = [r["fits"] for r in rows]
    assert fitting == sorted(fitting, reverse=True)  # layouts that fit come first


def test_table_and_memory_ordering(capsys):
    assert main(PLAN_13B + ["--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["TP", "PP", "DP"] and len(lines) == 4
    # full recompute stores less than none, and full sharding less model state than none
    args = SHAPE_13B + ["--bf16", "--sequence-parallel", "--top", "0", "--json"]
    main(args + ["--data-parallel-sharding", "none"])
    heavy = {(r["tp"], r["pp"]): r for r in json.loads(capsys.readouterr().out)}
    main(args + ["--recompute-granularity", "full", "--data-parallel-sharding", "full"])
    light = {(r["tp"], r["pp"]): r for r in json.loads(capsys.readouterr().out)}
    for key, r in light.items():
        assert r["activations_gb"] < heavy[key]["activations_gb"]
        assert r["optimizer_gb"] < heavy[key]["optimizer_gb"] or r["dp"] == 1


@pytest.mark.slow
def test_trace_adds_the_dry_run_peak_beside_the_estimate(capsys):
    assert main(["--model", "tiny", "--seq-length", "128", "--micro-batch-size", "1", "--global-batch-size", "8",
                 "--num-gpus", "2", "--gpu-memory-gb", "1", "--top", "1", "--trace", "--bf16",
                 "--data-parallel-sharding", "optimizer", "--json"]) == 0
    out = capsys.readouterr().out
    row = json.loads(out[out.index("["):])[0]
    # the tiny preset's fixed costs (a 32,000-token vocabulary) make it harder than the real shapes
    assert row["traced_gb"] == pytest.approx(row["total_gb"], rel=0.25)


def test_without_context_parallel_sizes_the_output_has_no_cp(capsys):
    assert main(PLAN_13B + ["--top", "3"]) == 0
    assert "CP" not in capsys.readouterr().out.splitlines()[0].split()
    assert main(PLAN_13B + ["--top", "0", "--json"]) == 0
    assert all("cp" not in r for r in json.loads(capsys.readouterr().out))


def test_context_parallel_sizes_enumerate_cp_layouts(capsys):
    assert main(PLAN_13B_32K + ["--context-parallel-sizes", "1", "2", "4", "--top", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["cp"] for r in rows} == {1, 2, 4}
    assert all(r["tp"] * r["pp"] * r["dp"] * r["cp"] == 64 and 128 % r["dp"] == 0 for r in rows)
    # at 32k tokens the fastest layout that fits splits the sequence
    best = rows[0]
    assert best["fits"] and best["cp"] > 1
    same = {(r["tp"], r["pp"], r["dp"] * r["cp"]): r for r in rows if r["cp"] == 1}
    with_cp = [r for r in rows if r["cp"] > 1 and (r["tp"], r["pp"], r["dp"] * r["cp"]) in same]
    assert with_cp and all(r["activations_gb"] < same[r["tp"], r["pp"], r["dp"] * r["cp"]]["activations_gb"]
                           for r in with_cp)
    assert main(PLAN_13B_32K + ["--context-parallel-sizes", "2", "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["TP", "PP", "DP", "CP"] and lines[1].split()[3] == "2"


@pytest.mark.slow
def test_trace_runs_the_context_parallel_layout(capsys):
    assert main(["--model", "tiny", "--seq-length", "256", "--micro-batch-size", "1", "--global-batch-size", "8",
                 "--num-gpus", "2", "--gpu-memory-gb", "1", "--top", "1", "--trace", "--bf16",
                 "--data-parallel-sharding", "optimizer", "--context-parallel-sizes", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert "x CP 2" in out
    row = json.loads(out[out.index("["):])[0]
    assert row["cp"] == 2 and row["dp"] == 1
    assert row["traced_gb"] == pytest.approx(row["total_gb"], rel=0.25)


@pytest.mark.parametrize("flags, named", [
    (["--num-gpus", "0"], "--num-gpus"),
    (["--recompute-granularity", "some"], "--recompute-granularity"),
    (["--model", "gpt9"], "--model"),
    (["--seq-length", "8192"], "--seq-length"),
    (["--num-gpus", "7"], "--num-gpus"),
    (["--context-parallel-sizes", "0"], "--context-parallel-sizes"),
    (["--gpu-memory-gb", "nan"], "--gpu-memory-gb"),
    (["--gpu-memory-gb", "inf"], "--gpu-memory-gb"),
    (["--gpu-memory-gb", "-80"], "--gpu-memory-gb"),
    (["--peak-tflops", "inf"], "--peak-tflops"),
    (["--efficiency", "nan"], "--efficiency"),
    (["--recompute", "selective"], "--recompute-granularity"),
    (["--dtype", "bf16"], "--bf16"),
    (["--tensor-model-parallel-size", "4"], "--tensor-model-parallel-size"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_flags_give_one_line_naming_the_flag(flags, named, capsys):
    assert main(PLAN_13B + flags) == 2  # a repeated flag's last value wins
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--data-parallel-sharding" in out and "--num-gpus" in out and "--reduce-grads-once-per-step" in out


def test_cp_sizes_without_a_layout_are_named(capsys):
    # 4096 tokens split over 2 x 3 chunks: no layout at CP 3, while CP 1 and 2 plan
    batch = ["--num-gpus", "48", "--global-batch-size", "96"]
    assert main(PLAN_13B + batch + ["--context-parallel-sizes", "1", "2", "3", "--top", "1"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--context-parallel-sizes 3" in err[0] and "2 x 3" in err[0], err
    # nothing plans: every size without a layout is named, each with its reason
    assert main(PLAN_13B + batch + ["--context-parallel-sizes", "3", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CP 3:" in err and "CP 5:" in err, err


def test_every_pretrain_flag_is_a_planner_flag():
    """The planner parses the run with pretrain's own parser: no flag that changes memory (or
    anything else) can be missing from it."""
    from megatron_mellama.config import build_parser as pretrain_parser
    from megatron_mellama.tools.plan_layout import LAYOUT_FLAGS, build_parser

    def flags(parser):
        return {s for a in parser._actions for s in a.option_strings}

    assert flags(pretrain_parser()) <= flags(build_parser())
    for flag in ("--reduce-grads-once-per-step", "--recompute-granularity", "--sequence-parallel",
                 "--num-layers-per-virtual-pipeline-stage", "--micro-batch-size", "--seq-length",
                 "--data-parallel-sharding", "--data-parallel-replicate-size", "--bf16", "--fp16",
                 "--kernel-backend", "--pipeline-schedule", "--config"):
        assert flag in flags(build_parser()), flag
    assert set(LAYOUT_FLAGS) <= flags(pretrain_parser())  # the flags each candidate sets


def _plan(argv, capsys) -> dict:
    """{(TP, PP): row} of the planner's JSON for `argv`."""
    assert main(argv + ["--top", "0", "--json"]) == 0
    return {(r["tp"], r["pp"]): r for r in json.loads(capsys.readouterr().out)}


@pytest.mark.parametrize("once", ["true", "false"])
def test_the_plan_is_the_memory_model_of_the_run_the_flags_describe(once, tmp_path, capsys):
    """What the planner lists for a layout is the memory model's figure for the very Config pretrain
    builds from the same flags and file with that layout; --reduce-grads-once-per-step (the
    recipes' setting) changes it."""
    recipe = tmp_path / "run.yaml"
    recipe.write_text(f"reduce-grads-once-per-step: {once}\nrecompute-granularity: selective\n")
    rows = _plan(SMALL + ["--config", str(recipe), "--num-gpus", "2", "--gpu-memory-gb", "80"], capsys)
    cfg = parse_config(["--config", str(recipe)] + SMALL, world_size=2)
    assert cfg.parallel.reduce_grads_once_per_step is (once == "true") and cfg.num_microbatches == 4
    expected = estimate(cfg, gpu_memory_gb=80, peak_tflops=312.0).as_dict()
    del expected["cp"]  # the JSON has no CP column without context parallelism
    assert rows[1, 1] == expected


def test_once_per_step_raises_the_planned_gradients(tmp_path, capsys):
    per_step, per_micro_batch = [], []
    for once, into in (("true", per_step), ("false", per_micro_batch)):
        recipe = tmp_path / f"{once}.yaml"
        recipe.write_text(f"reduce-grads-once-per-step: {once}\n")
        into.append(_plan(SMALL + ["--config", str(recipe), "--num-gpus", "2", "--gpu-memory-gb", "80"], capsys))
    whole, sharded = per_step[0][1, 1], per_micro_batch[0][1, 1]
    # whole fp32 gradients through the micro-batches, against a half (DP 2) of them
    assert whole["grads_gb"] == pytest.approx(2 * sharded["grads_gb"], rel=0.01)
    assert whole["total_gb"] > sharded["total_gb"]
