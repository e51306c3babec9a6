"""The layout planner: its model-state bytes match what the engine allocates, and its command line,
with and without context parallelism."""

import json

import pytest
import torch

from engine_harness import TINY, global_batches, micro_batches_of, spawn_gloo
from megatron_mellama.config import parse_config
from megatron_mellama.parallel.memory_model import model_state_bytes
from megatron_mellama.tools.plan_layout import main
from megatron_mellama.training.engine import Engine

PLAN_13B = ["--model", "llama2-13b", "--seq-length", "4096", "--micro-batch-size", "1", "--global-batch-size",
            "1024", "--gpu-memory-gb", "80", "--num-gpus", "160"]
PLAN_13B_32K = ["--model", "llama2-13b", "--seq-length", "32768", "--max-position-embeddings", "32768",
                "--rotary-base", "500000", "--micro-batch-size", "1", "--global-batch-size", "128",
                "--gpu-memory-gb", "80", "--num-gpus", "64"]


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
    args = PLAN_13B + ["--top", "0", "--json"]
    main(args + ["--recompute", "none", "--data-parallel-sharding", "none"])
    heavy = {(r["tp"], r["pp"]): r for r in json.loads(capsys.readouterr().out)}
    main(args + ["--recompute", "full", "--data-parallel-sharding", "full"])
    light = {(r["tp"], r["pp"]): r for r in json.loads(capsys.readouterr().out)}
    for key, r in light.items():
        assert r["activations_gb"] < heavy[key]["activations_gb"]
        assert r["optimizer_gb"] < heavy[key]["optimizer_gb"] or r["dp"] == 1


def test_trace_adds_the_dry_run_peak_beside_the_estimate(capsys):
    assert main(["--model", "tiny", "--seq-length", "128", "--micro-batch-size", "1", "--global-batch-size", "8",
                 "--num-gpus", "2", "--gpu-memory-gb", "1", "--top", "1", "--trace", "--recompute", "none",
                 "--json"]) == 0
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


def test_trace_runs_the_context_parallel_layout(capsys):
    assert main(["--model", "tiny", "--seq-length", "256", "--micro-batch-size", "1", "--global-batch-size", "8",
                 "--num-gpus", "2", "--gpu-memory-gb", "1", "--top", "1", "--trace", "--recompute", "none",
                 "--context-parallel-sizes", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert "x CP 2" in out
    row = json.loads(out[out.index("["):])[0]
    assert row["cp"] == 2 and row["dp"] == 1
    assert row["traced_gb"] == pytest.approx(row["total_gb"], rel=0.25)


@pytest.mark.parametrize("flags, named", [
    (["--num-gpus", "0"], "--num-gpus"),
    (["--recompute", "some"], "--recompute"),
    (["--model", "gpt9"], "--model"),
    (["--seq-length", "8192"], "--seq-length"),
    (["--num-gpus", "7"], "--num-gpus"),
    (["--context-parallel-sizes", "0"], "--context-parallel-sizes"),
])
def test_bad_flags_give_one_line_naming_the_flag(flags, named, capsys):
    assert main(PLAN_13B + flags) == 2  # a repeated flag's last value wins
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "--data-parallel-sharding" in capsys.readouterr().out
