"""Context parallelism: CP2 alone and composed with TP2 + SP, PP2 and FSDP equals one process, with and
without packed-document masking; packed documents on the flex route (CUDA's) equal one process and
build one BlockMask per micro-batch, of the rank's queries; a rank whose tokens are all masked stays
finite; the layout and its checks; checkpoints move between CP2 and CP1."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex_module
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from checkpoint_harness import train_segment, train_segment_distributed
from engine_harness import (TINY, assert_matches, reference, rel as _rel, run_distributed,
                            run_layouts_by_world)
from megatron_mellama.config import ConfigError, parse_config
from megatron_mellama.kernels import documents
from megatron_mellama.model import build_model
from megatron_mellama.parallel.context import (ContextParallelAttention, apply_context_parallel, chunk_document_mask,
                                               chunk_positions)
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


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """Every case below, from one launch per world size: {(name, packed): every rank's results}."""
    cases = {(name, packed): (LAYOUTS[name][0], TINY + (PACKED if packed else []) + LAYOUTS[name][1])
             for name, packed in CASES}
    return run_layouts_by_world(cases, STEPS, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("name,packed", CASES,
                         ids=[f"{n}-{'packed-documents' if p else 'causal'}" for n, p in CASES])
def test_layout_equals_one_process(name, packed, references, layout_runs):
    assert_matches(layout_runs[name, packed], references[packed], 1e-5)


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_fused_lower_right_path_equals_one_process(references, tmp_path):
    from engine_harness import spawn_gloo

    results = spawn_gloo(_fused_lower_right_rank, 2, (TINY + CP2, STEPS), str(tmp_path))
    assert_matches(results, references[False], 1e-5)


# --- packed documents on the flex route: what CUDA runs, here on the CPU ----------------------------

def _tile_loop_taken(*args, **kwargs):
    raise AssertionError("the context-parallel attention took the tile loop, not flex attention")


def _force_flex_route(set_attr, flex_calls=None):
    """Send packed documents the CUDA way on the CPU: a BlockMask, and flex attention uncompiled (its
    eager math, every score materialised: fine at these sizes; it has a backward on any device once
    the CPU passes its device check). The tile loop fails; `flex_calls` collects each call's mask."""
    def eager_flex(q, k, v, block_mask, enable_gqa):
        if flex_calls is not None:
            flex_calls.append(block_mask)
        return flex_module.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)

    set_attr(documents, "FLEX_DEVICE_TYPES", ("cpu",))
    set_attr(documents, "_compiled_flex_attention", lambda: eager_flex)
    set_attr(flex_module, "_validate_device", lambda q, k, v: None)
    set_attr(documents, "attention_by_tiles", _tile_loop_taken)


def _packed_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.rand(batch, seq, generator=g) < 0.02, dim=1)


def _same_document_causal_dense(ids: torch.Tensor) -> torch.Tensor:
    position = torch.arange(ids.shape[1])
    return (position[None, :, None] >= position[None, None, :]) & (ids[:, :, None] == ids[:, None, :])


# (cp, seq): chunks of 75 (a query tile holds the end of one chunk and the start of the other)
# and of 128 (whole tiles)
SPLITS = [(2, 300), (3, 768)]


@pytest.mark.parametrize("cp,seq", SPLITS)
def test_a_ranks_block_mask_holds_every_tile_its_queries_read(cp, seq):
    ids = _packed_ids(2, seq, seed=cp)
    for rank in range(cp):
        held = chunk_positions(seq, cp, rank)
        for block in (16, 32, 128):
            ours = documents.document_block_mask(ids, block, query_positions=held)

            def same_document_causal(b, h, q, kv):
                return (kv <= held[q]) & (ids[b, held[q]] == ids[b, kv])

            theirs = create_block_mask(same_document_causal, 2, None, len(held), seq, device="cpu", BLOCK_SIZE=block)
            assert ours.shape == theirs.shape == (2, 1, len(held), seq)
            # full tiles (read without the mask function) exactly; the others may be a superset
            # only in the tile where the two chunks meet
            assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks), (rank, block)
            assert (ours.to_dense() >= theirs.to_dense()).all(), (rank, block)
            if (seq // (2 * cp)) % block == 0:
                assert torch.equal(ours.to_dense(), theirs.to_dense()), (rank, block)


@pytest.mark.parametrize("cp,seq", SPLITS)
def test_the_flex_route_of_each_rank_equals_dense_attention_with_gradients(cp, seq, monkeypatch):
    # one process plays every rank: the all-gather hands over the whole sequence's keys and values
    # (its backward, a reduce-scatter, is the collective's), the rank's queries are its chunks
    _force_flex_route(monkeypatch.setattr)
    g = torch.Generator().manual_seed(0)
    ids = _packed_ids(2, seq, seed=cp)
    q, k, v = (torch.randn(2, h, seq, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    weight = torch.randn(2, 4, seq, 16, generator=g)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_same_document_causal_dense(ids)[:, None],
                                          enable_gqa=True)
    for rank in range(cp):
        held = chunk_positions(seq, cp, rank)
        attend = ContextParallelAttention(None, cp, rank, seq)
        gathered = iter((k, v))
        monkeypatch.setattr(attend, "_gather_in_order", lambda t, seq_len: next(gathered))
        got = attend(q[:, :, held], k[:, :, held], v[:, :, held], chunk_document_mask(ids, cp, rank))
        torch.testing.assert_close(got, want[:, :, held], rtol=1e-5, atol=1e-5)
        got_grads = torch.autograd.grad((got * weight[:, :, held]).sum(), (q, k, v))
        want_grads = torch.autograd.grad((want[:, :, held] * weight[:, :, held]).sum(), (q, k, v), retain_graph=True)
        for got_grad, want_grad in zip(got_grads, want_grads):
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_flex_attention_reads_a_ranks_block_mask_as_intended():
    # the eager flex route above applies the mask function to every score and never reads the
    # tiles; compiled (forward only on the CPU) it skips and trusts them as CUDA's kernel does.
    # A fresh compile: recompiled after another shape, dynamo makes the shapes dynamic, which
    # inductor's CPU flex template cannot build (torch 2.13)
    torch.compiler.reset()
    cp, seq = SPLITS[0]
    g = torch.Generator().manual_seed(0)
    ids = _packed_ids(2, seq, seed=cp)
    q, k, v = (torch.randn(2, h, seq, 16, generator=g) for h in (4, 2, 2))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_same_document_causal_dense(ids)[:, None],
                                          enable_gqa=True)
    for rank in range(cp):
        held = chunk_positions(seq, cp, rank)
        mask = documents.document_block_mask(ids, query_positions=held)
        got = documents._compiled_flex_attention()(q[:, :, held], k, v, block_mask=mask, enable_gqa=True)
        torch.testing.assert_close(got, want[:, :, held], rtol=1e-5, atol=1e-5)


class _HostReads(TorchDispatchMode):
    """Operations that make the host wait for the device: a value read back, or a boolean index
    (its nonzero sizes the result)."""
    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.masked_select")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name.startswith(self.READS) or boolean_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def test_a_ranks_block_mask_is_built_without_reading_the_device(monkeypatch):
    # once per micro-batch on CUDA: a value read back there would stall the GPU every micro-batch
    monkeypatch.setattr(documents, "FLEX_DEVICE_TYPES", ("cpu",))
    ids = _packed_ids(2, 300)
    with _HostReads() as reads:
        mask = chunk_document_mask(ids, 2, 1).block_mask
    assert mask is not None and reads.found == []


class _FakeCpMesh:
    def __init__(self, cp: int, rank: int):
        self.cp, self.rank = cp, rank

    def get_group(self):
        return None

    def size(self):
        return self.cp

    def get_local_rank(self):
        return self.rank


def test_the_forward_builds_one_block_mask_per_micro_batch_the_one_every_layer_uses(monkeypatch):
    flex_calls, built = [], []
    _force_flex_route(monkeypatch.setattr, flex_calls)
    build = documents.document_block_mask

    def counted_build(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(documents, "document_block_mask", counted_build)
    # the keys and values of the other rank are not there: any of the right length will do
    monkeypatch.setattr(ContextParallelAttention, "_gather_in_order",
                        lambda self, t, seq_len: t.repeat(1, 1, self.cp, 1))
    cp, seq = 2, 32
    cfg = parse_config(TINY + PACKED)
    model = apply_context_parallel(build_model(cfg.model, seed=3), _FakeCpMesh(cp, 1), seq)
    ids = _packed_ids(2, seq)
    held = chunk_positions(seq, cp, 1)
    for micro_batch in range(2):
        model(torch.randint(0, 100, (2, seq // cp)), position_ids=held.expand(2, -1), document_ids=ids)
        assert len(built) == micro_batch + 1
        assert built[-1].shape == (2, 1, seq // cp, seq)  # this rank's queries against every key
        layer_masks = flex_calls[micro_batch * cfg.model.num_layers:]
        assert len(layer_masks) == cfg.model.num_layers and all(m is built[-1] for m in layer_masks)


def _flex_route_rank(rank, world, argv, steps):
    from engine_harness import _engine_rank

    _force_flex_route(setattr)
    return _engine_rank(rank, world, argv, steps)


@pytest.mark.slow
def test_the_flex_route_with_packed_documents_equals_one_process(references, tmp_path):
    from engine_harness import spawn_gloo

    results = spawn_gloo(_flex_route_rank, 2, (TINY + PACKED + CP2, STEPS), str(tmp_path))
    assert_matches(results, references[True], 1e-5)


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


@pytest.mark.slow
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


@pytest.mark.slow
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
