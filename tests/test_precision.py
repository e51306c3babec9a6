"""Mixed precision as the design states it: bf16 compute weights (FSDP2's param_dtype) in every
layout that has a process group, fp32 master weights, gradients reduced in fp32 onto fp32 shards
every micro-batch in the sharded modes, norms returning the compute dtype; fp16 with loss scaling.

The multi-process layouts run in one set of 4 gloo ranks (starting processes costs more than the
layouts) and are held to the fp32 one-process reference within a bf16 tolerance (see
`test_bf16_layouts_track_the_fp32_reference`).
"""

import contextlib
import math

import pytest
import torch
from engine_harness import TINY, global_batches, micro_batches_of, reference, spawn_gloo

from megatron_mellama import kernels
from megatron_mellama.config import parse_config
from megatron_mellama.config.validate import ZERO_BUBBLE_TORCH, torch_at_least
from megatron_mellama.kernels import reference as ref_kernels
from megatron_mellama.model.init import initial_value

STEPS = 2
# 16 sequences in micro-batches of 2: with DP 2 each rank runs 4 micro-batches per step
ARGV = TINY + ["--global-batch-size", "16"]
LAYOUTS = {
    # DP 2 x TP 2, ZeRO-2: 4 micro-batches per rank, gradients reduce-scattered after each (not the
    # default, once per step)
    "tp2-dp2-zero2": ["--tensor-model-parallel-size", "2", "--data-parallel-sharding", "optimizer",
                      "--no-reduce-grads-once-per-step"],
    # DP 1: the 1-rank replicate wrapper gives bf16 weights; stages exchange bf16; the SP norm
    "tp2-sp-pp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"],
    # sharded gradients inside the pipeline schedule (1F1B, 4 micro-batches per DP rank)
    "pp2-dp2-zero3": ["--pipeline-model-parallel-size", "2", "--data-parallel-sharding", "full"],
    # HSDP 2 x 2: reduce-scatter every micro-batch, all-reduce across replica groups with the last
    "hsdp-zero3": ["--data-parallel-sharding", "full", "--data-parallel-replicate-size", "2"],
    # DDP (FSDP2's replicate): gradients kept unreduced until the last micro-batch
    "dp4-ddp": ["--data-parallel-sharding", "none"],
}
if torch_at_least(ZERO_BUBBLE_TORCH):
    # the split weight-gradient pass writes gradients outside FSDP's hooks
    LAYOUTS["pp2-dp2-zero2-zb"] = ["--pipeline-model-parallel-size", "2", "--data-parallel-sharding", "optimizer",
                                   "--no-reduce-grads-once-per-step", "--pipeline-schedule", "zero-bubble"]
FP16 = ["--fp16", "--initial-loss-scale", "1024", "--data-parallel-sharding", "optimizer"]


# ---------------------------------------------------------------- the norm's dtype, one process

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_norm_returns_the_compute_dtype_with_fp32_statistics(backend):
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(3, 5, 64, generator=g) * 3
    w32 = 1 + 0.1 * torch.randn(64, generator=g)
    with kernels.use_backends({"rms_norm": backend}):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # fp32 residual and fp32 weight (the one-process path): the autocast dtype, and exactly
            # the fp32 result rounded once (statistics taken in fp32, not in bf16)
            out = kernels.rms_norm(x32, w32, 1e-5)
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out, ref_kernels.rms_norm(x32, w32, 1e-5).bfloat16(), rtol=0, atol=0)
            # bf16 activations, fp32 weight: bf16 too (it was fp32, promoted)
            assert kernels.rms_norm(x32.bfloat16(), w32, 1e-5).dtype == torch.bfloat16
        # without autocast: the promoted dtype
        assert kernels.rms_norm(x32.bfloat16(), w32.bfloat16(), 1e-5).dtype == torch.bfloat16
        assert kernels.rms_norm(x32.bfloat16(), w32, 1e-5).dtype == torch.float32
        assert kernels.rms_norm(x32, w32, 1e-5).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.float16):
            assert kernels.rms_norm(x32, w32, 1e-5).dtype == torch.float16
    # gradients come back in the inputs' dtypes
    x, w = x32.clone().requires_grad_(), w32.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.rms_norm(x, w, 1e-5)
    out.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32


# ---------------------------------------------------------------- probes inside the ranks

def _dtype(t):
    return str(t.dtype).removeprefix("torch.")


from test_data_parallel import _count_collectives  # noqa: E402  (FSDP2's gathers and reductions, by dtype)


def _install_dtype_probes(engine, seen: dict) -> None:
    """Record the dtypes the layers compute with: weights and inputs of every linear layer, the
    residual stream entering each decoder layer, what each stage sends forward and backward."""
    from torch import nn

    def note(key, value):
        seen.setdefault(key, set()).add(value)

    def linear_hook(m, args, out):
        note("linear weight", _dtype(m.weight))
        note("linear input", _dtype(args[0]))

    for part in engine.modules:
        for module in part.modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(linear_hook)
        for layer in part.layers.values():
            layer.register_forward_pre_hook(lambda m, args: note("residual stream", _dtype(args[0])))
            layer.input_layernorm.register_forward_hook(lambda m, args, out: note("norm output", _dtype(out)))
        if engine.dims.pp > 1:
            def stage_hook(m, args, out):
                if m.embed_tokens is None and args[0].requires_grad:  # received from the previous stage
                    note("stage input", _dtype(args[0]))
                    args[0].register_hook(lambda g: note("stage input gradient (sent back)", _dtype(g)))
                if m.lm_head is None:
                    note("stage output (sent on)", _dtype(out))
            part.register_forward_hook(stage_hook)


def _sharded_grads_report(params: dict, dp_shard: int) -> dict:
    """How the fp32 master weights' gradients look now: sharded like their weights (1/N), or not."""
    report = dict(missing=0, unsharded=0, dtypes=set(), local=0, total=0)
    for p in params.values():
        g = p.grad
        report["total"] += p.numel()
        if g is None:
            report["missing"] += 1
            continue
        report["dtypes"].add(_dtype(g))
        local = g.to_local() if hasattr(g, "to_local") else g
        report["local"] += local.numel()
        if not hasattr(g, "placements") or g.placements != p.placements or local.shape != p.to_local().shape:
            report["unsharded"] += 1
    report["fraction"] = report["local"] / report["total"]
    report["expected_fraction"] = 1 / dp_shard
    return report


def _micro_batch_probes(engine, mesh_dims, n_micro: int, records: list):
    """After each non-last micro-batch's backward: the gradient report and the collectives it ran.
    Returns a function that ends the probing."""
    from megatron_mellama.parallel import pipeline
    from megatron_mellama.training import engine as engine_module

    params = {n: p for part in engine.modules for n, p in part.named_parameters()}  # sharded, fp32
    state = {"stack": None, "counter": None, "calls": 0}

    def start():
        state["stack"] = contextlib.ExitStack()
        state["counter"] = state["stack"].enter_context(_count_collectives())

    def stop(record: bool):
        if state["stack"] is None:
            return
        state["stack"].close()
        state["stack"] = None
        if record:
            records.append(dict(last=False, collectives=dict(state["counter"]),
                                grads=_sharded_grads_report(params, mesh_dims.dp_shard)))

    if engine.schedule is None:
        original = engine_module.set_gradient_sync

        def set_gradient_sync(module, enabled):
            # called before each micro-batch's forward: the previous one's backward is done, and it
            # was not the last of its step unless this is the first micro-batch of a step
            stop(record=state["calls"] % n_micro != 0)
            state["calls"] += 1
            original(module, enabled)
            start()

        engine_module.set_gradient_sync = set_gradient_sync
    else:
        original = pipeline._Stage.backward_maybe_with_nosync

        def backward(self, backward_type, bwd_kwargs, last_backward=False):
            start()
            out = original(self, backward_type, bwd_kwargs, last_backward)
            stop(record=backward_type != "input" and not last_backward)
            return out

        pipeline._Stage.backward_maybe_with_nosync = backward
    return lambda: stop(record=False)


def _layout_rank(rank, world, argv, steps, probe):
    from megatron_mellama.config import parse_config
    from megatron_mellama.parallel.mesh import ParallelDims
    from megatron_mellama.parallel import pipeline
    from megatron_mellama.training import engine as engine_module
    from megatron_mellama.training.engine import Engine

    saved = engine_module.set_gradient_sync, pipeline._Stage.backward_maybe_with_nosync
    try:
        cfg = parse_config(argv, world_size=world)
        dims = ParallelDims.from_config(cfg, world)
        engine = Engine(cfg, dims.build_mesh("cpu"))
        dp_rank = dims.coordinates(rank)["dp"]
        seen, records, end_probes = {}, [], lambda: None
        if probe:
            _install_dtype_probes(engine, seen)
            n_micro = cfg.train.global_batch_size // dims.dp // cfg.train.micro_batch_size
            end_probes = _micro_batch_probes(engine, dims, n_micro, records)
        master = {_dtype(p) for part in engine.modules for p in part.parameters()}
        losses, norms, skipped = [], [], []
        for batch in global_batches(cfg, steps):
            result = engine.step(micro_batches_of(batch, cfg, dp_rank, dims.dp))
            losses.append(result.loss)
            norms.append(result.grad_norm)
            skipped.append(result.skipped)
        end_probes()
        return dict(losses=losses, grad_norms=norms, skipped=skipped, params=engine.full_state(),
                    seen=seen, records=records, master=master, coords=dims.coordinates(rank),
                    dp_shard=dims.dp_shard)
    finally:
        engine_module.set_gradient_sync, pipeline._Stage.backward_maybe_with_nosync = saved


def _fp16_rank(rank, world, argv):
    """fp16: an overflowing loss scale skips the step on every rank; a sane one trains."""
    from megatron_mellama.config import parse_config
    from megatron_mellama.parallel.mesh import ParallelDims
    from megatron_mellama.training.engine import Engine

    cfg = parse_config(argv, world_size=world)
    dims = ParallelDims.from_config(cfg, world)
    engine = Engine(cfg, dims.build_mesh("cpu"))
    dp_rank = dims.coordinates(rank)["dp"]
    batches = global_batches(cfg, STEPS)
    before = engine.full_state()
    engine.scaler.loss_scale = 2.0 ** 40  # fp16 gradients overflow at once
    overflow = engine.step(micro_batches_of(batches[0], cfg, dp_rank, dims.dp))
    unchanged = all(torch.equal(before[k], v) for k, v in engine.full_state().items())
    engine.scaler.loss_scale = 1024.0
    results = [engine.step(micro_batches_of(b, cfg, dp_rank, dims.dp)) for b in batches]
    overflow = dict(skipped=overflow.skipped, grad_norm=overflow.grad_norm)
    return dict(overflow=overflow, unchanged=unchanged, losses=[r.loss for r in results],
                skipped=[r.skipped for r in results], master={_dtype(p) for p in engine.modules[0].parameters()})


def _all_layouts(rank, world):
    out = {name: _layout_rank(rank, world, ARGV + ["--bf16"] + flags, STEPS, probe=True)
           for name, flags in LAYOUTS.items()}
    out["fp16"] = _fp16_rank(rank, world, ARGV + FP16)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_gloo(_all_layouts, 4, (), str(tmp_path_factory.mktemp("precision")))


@pytest.fixture(scope="module")
def fp32_reference():
    return reference(ARGV, STEPS)


@pytest.fixture(scope="module")
def bf16_one_process():
    # one process has no process group: fp32 weights under autocast
    return reference(ARGV + ["--bf16"], STEPS)


def _rel(a, b):
    return abs(a - b) / abs(b)


def _merged(results):
    params = {}
    for r in results:
        params.update(r["params"])
    return params


def _update_error(params, ref, cfg) -> float:
    """The largest, over tensors, of |p - p_fp32| / |p_fp32 - p_initial|: how much of the fp32 run's
    update of a tensor came out otherwise."""
    worst = 0.0
    for name, want in ref.items():
        start = initial_value(cfg.model, name, tuple(want.shape), cfg.train.seed)
        worst = max(worst, ((params[name] - want).norm() / (want - start).norm()).item())
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_layouts_track_the_fp32_reference(name, ranks, fp32_reference, bf16_one_process):
    """Tolerances. bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3): one rounding of a
    weight, an activation or a gradient is off by up to that.
    - loss: a token mean of fp32 log-sum-exps, whose rounding errors average out; 2e-3 relative
      is one bf16 rounding of the result (seen: ~2e-5).
    - grad norm: the norm of gradients computed from bf16 operands; 1e-2 relative (seen: < 1e-3).
      A micro-batch's gradients lost or counted twice would move it by tens of percent.
    - parameters: Adam's first steps are nearly sign(g) x lr per element, so an element whose
      gradient is below bf16's resolution gets a step of either sign. Measured against the fp32
      run's update of each tensor (not its size: two steps move the output projections by ~20%),
      bf16 changes up to ~15% of it in the one-process bf16 run (autocast over fp32 weights, the
      precision path accepted before) and ~10% in these layouts: at most 25%, and at most twice
      the one-process run's worst, i.e. the layout adds no error of its own beyond bf16's."""
    cfg = parse_config(ARGV)
    results = [r[name] for r in ranks]
    ref, one = fp32_reference, bf16_one_process
    for r in results:
        assert not any(r["skipped"]) and r["master"] == {"float32"}
        for got, want in zip(r["losses"], ref["losses"]):
            assert _rel(got, want) < 2e-3, (name, r["losses"], ref["losses"])
        for got, want in zip(r["grad_norms"], ref["grad_norms"]):
            assert _rel(got, want) < 1e-2, (name, r["grad_norms"], ref["grad_norms"])
    params = _merged(results)
    assert set(params) == set(ref["params"]) and all(p.dtype == torch.float32 for p in params.values())
    error, alone = _update_error(params, ref["params"], cfg), _update_error(one["params"], ref["params"], cfg)
    assert error < 0.25 and error <= 2 * alone, (name, error, alone)
    # and not the fp32 run itself: bf16 computation really happened
    assert error > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layers_compute_with_bf16_weights_and_activations(name, ranks):
    for r in ranks:
        seen = r[name]["seen"]
        # FSDP2's gathered weights and everything flowing between layers and stages are bf16
        assert seen["linear weight"] == {"bfloat16"}, seen
        assert seen["linear input"] == seen["norm output"] == seen["residual stream"] == {"bfloat16"}, seen
        if "pp2" in name and r[name]["coords"]["pp"] == 1:
            assert seen["stage input"] == seen["stage input gradient (sent back)"] == {"bfloat16"}, seen
        if "pp2" in name and r[name]["coords"]["pp"] == 0:
            assert seen["stage output (sent on)"] == {"bfloat16"}, seen


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LAYOUTS if "zero" in n])
def test_sharded_modes_reduce_scatter_every_micro_batch(name, ranks):
    """After a micro-batch that is not the last of its step, the gradients are already reduced, in
    fp32: fp32, sharded like the weights (1/N of them on this rank). Before the fix they were kept
    whole and unreduced until the last micro-batch."""
    for r in ranks:
        records = [rec for rec in r[name]["records"] if not rec["last"]]
        assert records, "no micro-batch was probed"
        for rec in records:
            grads, coll = rec["grads"], rec["collectives"]
            assert coll.get("reduce_scatter", 0) > 0, rec
            # bf16 gradients, reduced in fp32 (every tensor handed to the collective is fp32)
            assert coll["reduce_scatter"] * 2 == coll.get("reduce_scatter float32", 0), rec
            if name.startswith("hsdp"):
                # the shards are summed locally; the all-reduce across replica groups waits
                assert coll.get("all_reduce", 0) == 0, rec
                continue
            assert grads["missing"] == grads["unsharded"] == 0 and grads["dtypes"] == {"float32"}, rec
            assert grads["fraction"] <= grads["expected_fraction"] * 1.05, rec


@pytest.mark.slow
def test_fp16_skips_an_overflowing_step_then_trains(ranks, fp32_reference):
    for r in ranks:
        f = r["fp16"]
        assert f["overflow"]["skipped"] and not math.isfinite(f["overflow"]["grad_norm"]) and f["unchanged"]
        assert not any(f["skipped"]) and f["master"] == {"float32"}
        # fp16 keeps 11 significant bits: tighter than bf16
        for got, want in zip(f["losses"], fp32_reference["losses"]):
            assert _rel(got, want) < 2e-3, (f["losses"], fp32_reference["losses"])


@pytest.mark.slow
def test_ddp_keeps_gradients_unreduced_until_the_last_micro_batch(ranks):
    for r in ranks:
        records = r["dp4-ddp"]["records"]
        assert records
        for rec in records:
            assert rec["collectives"] == {} and rec["grads"]["missing"] == len(r["dp4-ddp"]["params"]), rec
