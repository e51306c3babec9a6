"""Data parallel (DDP, ZeRO-2 like, FSDP, HSDP), activation checkpointing and compile.

The reference is one process training the same model on the whole global batch: every layout
must reach the same losses and parameters to fp32 rounding.
"""

import contextlib
import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from engine_harness import spawn_gloo
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mellama.config import parse_config
from megatron_mellama.model import Llama, materialise
from megatron_mellama.model.init import initial_value
from megatron_mellama.parallel.recompute import apply_activation_checkpointing, apply_compile

STEPS, MICRO_BATCHES, GLOBAL_BATCH, SEED = 3, 2, 8, 7


def _cfg():
    return parse_config(["--model", "tiny", "--vocab-size", "128", "--seq-length", "16"]).model


def _batches(cfg):
    """STEPS global batches of (tokens, labels, mask), GLOBAL_BATCH sequences each."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        data = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, 17), generator=g)
        mask = torch.ones(GLOBAL_BATCH, 16)
        mask[1, -5:] = 0  # uneven token counts across ranks
        out.append((data[:, :-1], data[:, 1:], mask))
    return out


def _init(model, cfg):
    """Materialise a meta-built model and fill it with the layout-independent initial values."""
    return materialise(model, cfg, "cpu", seed=SEED)


def _train(model, cfg, dp_rank=0, dp_size=1, sync=lambda enabled: None):
    """STEPS AdamW steps of MICRO_BATCHES micro-batches; returns losses, full parameters and the
    collectives counted in each micro-batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses, collectives = [], []
    for tokens, labels, mask in _batches(cfg):
        n_tokens = mask.sum()
        share = GLOBAL_BATCH // dp_size
        rows = slice(dp_rank * share, (dp_rank + 1) * share)
        total = torch.zeros(())
        for i, (t, y, m) in enumerate(zip(*(x[rows].chunk(MICRO_BATCHES) for x in (tokens, labels, mask)))):
            sync(i == MICRO_BATCHES - 1)
            with _count_collectives() as count:
                logits = model(t).float()
                token_loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
                # gradients are averaged over dp ranks: scale each rank's share of the sum by dp
                loss = (token_loss * m.flatten()).sum() / n_tokens * dp_size
                loss.backward()
            collectives.append(count)
            total += loss.detach() / dp_size
        if dp_size > 1:
            dist.all_reduce(total)
        losses.append(total.item())
        opt.step()
        opt.zero_grad()
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in model.named_parameters()}
    return losses, params, collectives


@contextlib.contextmanager
def _count_collectives():
    """Counts the weight gathers and gradient reductions FSDP2 launches (it looks these up on `dist`
    at each call), and each tensor they take by dtype."""
    # torch 2.13's FSDP2 calls the `_single` collectives; earlier releases the `_tensor` ones
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    reduce = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
    kinds = {gather: "gather", reduce: "reduce_scatter", "all_reduce": "all_reduce"}
    count, originals = Counter(), {name: getattr(dist, name) for name in kinds}

    def counted(name, fn):
        def call(*args, **kwargs):
            count[kinds[name]] += 1
            for t in (*args, *kwargs.values()):
                if isinstance(t, torch.Tensor):  # and the dtype it runs in, e.g. "reduce_scatter float32"
                    count[f"{kinds[name]} {str(t.dtype).removeprefix('torch.')}"] += 1
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield count
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _train_layouts(rank, world, layouts):
    from megatron_mellama.parallel.data import apply_data_parallel, set_gradient_sync
    from megatron_mellama.parallel.mesh import ParallelDims

    cfg = _cfg()
    out = {}
    for name, (sharding, replicate, recompute, param_dtype, *once) in layouts.items():
        dims = ParallelDims(pp=1, dp_replicate=replicate, dp_shard=world // replicate, tp=1)
        meshes = dims.build_mesh("cpu")
        with torch.device("meta"):
            model = Llama(cfg)
        if recompute:
            apply_activation_checkpointing(model, recompute)
        apply_data_parallel(model, meshes, sharding, param_dtype=param_dtype, reduce_once_per_step=bool(once))
        _init(model, cfg)
        placements = {p.placements for p in model.parameters()}
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
        result = _train(model, cfg, meshes.dp.get_local_rank(), dims.dp,
                        sync=lambda enabled: set_gradient_sync(model, enabled))
        out[name] = dict(result=result, placements=[str(p) for p in placements])
    # the tests read rank 0's copy only: the others' need not be written to disk
    return out if rank == 0 else None


# name: (sharding, dp_replicate, recompute, param_dtype[, reduce once per step]); the 4-rank layouts
# are 2 replicas x 2 shards
LAYOUTS_2 = {"none": ("none", 2, None, None), "optimizer": ("optimizer", 1, None, None),
             "optimizer_once": ("optimizer", 1, None, None, True),
             "full": ("full", 1, "selective", None), "full_bf16": ("full", 1, None, torch.bfloat16)}
LAYOUTS_4 = {"hsdp_full": ("full", 2, "full", None), "hsdp_optimizer": ("optimizer", 2, None, None)}
FP32_2 = [name for name, layout in LAYOUTS_2.items() if layout[3] is None]


@pytest.fixture(scope="module")
def reference():
    cfg = _cfg()
    with torch.device("meta"):
        model = Llama(cfg)
    return _train(_init(model, cfg), cfg)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_gloo(_train_layouts, 2, (LAYOUTS_2,), str(tmp_path_factory.mktemp("dp2")))[0]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return spawn_gloo(_train_layouts, 4, (LAYOUTS_4,), str(tmp_path_factory.mktemp("dp4")))[0]


def _assert_same(got, reference, sharded, once=False):
    (losses, params, collectives), (ref_losses, ref_params, _) = got, reference
    scatters = [c["reduce_scatter"] for c in collectives]
    all_reduces = [c["all_reduce"] for c in collectives]
    # gradient accumulation: DDP reduces nothing after the first micro-batch of a step, all after
    # the last; the sharded modes reduce-scatter after every micro-batch, and HSDP all-reduces the
    # shards across replica groups after the last only
    assert all_reduces[0::MICRO_BATCHES] == [0] * STEPS
    if sharded and once:  # --reduce-grads-once-per-step: reduce-scatter after the last micro-batch only
        last = scatters[MICRO_BATCHES - 1::MICRO_BATCHES]
        assert min(last) > 0 and sum(scatters) == sum(last)
    elif sharded:
        assert min(scatters) > 0
    else:
        assert scatters == [0] * len(scatters) and min(all_reduces[MICRO_BATCHES - 1::MICRO_BATCHES]) > 0
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    assert list(params) == list(ref_params)  # names unchanged, same order
    for name, p in params.items():
        # per tensor, not per element: Adam turns the rounding noise of a gradient element that
        # is ~0 (|g| ~ eps) into a different step for that one element
        error = (p - ref_params[name]).norm() / ref_params[name].norm()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", FP32_2)
def test_two_ranks_match_one_process(layout, two_ranks, reference):
    once = LAYOUTS_2[layout][4:] == (True,)
    _assert_same(two_ranks[layout]["result"], reference, sharded=LAYOUTS_2[layout][0] != "none", once=once)


@pytest.mark.slow
def test_sharding_modes_place_parameters(two_ranks):
    assert two_ranks["none"]["placements"] == ["(Replicate(),)"]
    assert two_ranks["optimizer"]["placements"] == ["(Shard(dim=0),)"]
    assert two_ranks["full"]["placements"] == ["(Shard(dim=0),)"]
    assert two_ranks["full_bf16"]["placements"] == ["(Shard(dim=0),)"]


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights_and_tracks_fp32(two_ranks, reference):
    (losses, params, _), (ref_losses, ref_params, _) = two_ranks["full_bf16"]["result"], reference
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-2, atol=0)
    assert all(p.dtype == torch.float32 for p in params.values())


def test_training_moved_the_parameters(reference):
    cfg = _cfg()
    moved = [(p - initial_value(cfg, name, tuple(p.shape), SEED)).norm() / p.norm() for name, p in reference[1].items()]
    assert min(moved) > 1e-3  # far above the 1e-5 the layouts are held to


@pytest.mark.slow
def test_weight_gathers_follow_the_sharding_mode(two_ranks, four_ranks):
    def gathers(layouts, name):
        return [c["gather"] for c in layouts[name]["result"][2]]

    assert set(gathers(two_ranks, "none")) == {0}
    # ZeRO-2: gathered once per step, kept through the accumulation; ZeRO-3: again for each
    # micro-batch's forward and backward
    for layouts, name in ((two_ranks, "optimizer"), (four_ranks, "hsdp_optimizer")):
        assert gathers(layouts, name)[1::MICRO_BATCHES] == [0] * STEPS and min(gathers(layouts, name)) == 0
    full = gathers(two_ranks, "full")
    assert min(full) > 0 and full == gathers(four_ranks, "hsdp_full")


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS_4))
def test_hsdp_on_four_ranks_matches_one_process(layout, four_ranks, reference):
    assert four_ranks[layout]["placements"] == ["(Replicate(), Shard(dim=0))"]
    _assert_same(four_ranks[layout]["result"], reference, sharded=True)
    all_reduces = [c["all_reduce"] for c in four_ranks[layout]["result"][2]]
    assert min(all_reduces[MICRO_BATCHES - 1::MICRO_BATCHES]) > 0


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _grads_and_backward_ops(model, tokens):
    """Gradients, and the ops run during backward (recomputation shows up there)."""
    loss = model(tokens).logsumexp(-1).sum()
    with _OpCounter() as ops:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, ops.counts


def _model(cfg):
    with torch.device("meta"):
        model = Llama(cfg)
    return _init(model, cfg)


def test_activation_checkpointing_keeps_gradients_and_names_and_recomputes():
    cfg = _cfg()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    ref, ref_ops = _grads_and_backward_ops(_model(cfg), tokens)
    ops = {}
    for granularity in ("selective", "full"):
        grads, ops[granularity] = _grads_and_backward_ops(
            apply_activation_checkpointing(_model(cfg), granularity), tokens)
        assert list(grads) == list(ref)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[name], rtol=1e-6, atol=1e-7, msg=f"{granularity}: {name}")
    # both recompute the norms; only full recomputes the matmuls and attention
    assert ref_ops["rsqrt"] == 0 and ops["selective"]["rsqrt"] > 0 and ops["full"]["rsqrt"] > 0
    assert ops["selective"]["mm"] == ref_ops["mm"] < ops["full"]["mm"]
    with pytest.raises(ValueError):
        apply_activation_checkpointing(_model(cfg), "attention")


@pytest.mark.skipif(not os.environ.get("MELLAMA_TEST_COMPILE"),
                    reason="compiling takes ~20 s on CPU; set MELLAMA_TEST_COMPILE=1")
def test_compile_keeps_gradients_and_names():
    cfg = _cfg()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    ref, _ = _grads_and_backward_ops(_model(cfg), tokens)
    grads, _ = _grads_and_backward_ops(apply_compile(apply_activation_checkpointing(_model(cfg), "selective")), tokens)
    assert list(grads) == list(ref)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-6, msg=name)
