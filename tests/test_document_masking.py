"""Packed documents (--reset-position-ids, --reset-attention-mask, --eod-mask-loss): each token of a
sample that packs several documents gets the loss it has when its document runs alone, in every
parallel layout, and attention never holds a (seq, seq) mask."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from engine_harness import (TINY, assert_matches, global_batches, micro_batches_of, reference, rel as _rel,
                            run_layouts_by_world)
from megatron_mellama.config import ConfigError, parse_config
from megatron_mellama.config.validate import ZERO_BUBBLE_TORCH, torch_at_least
from megatron_mellama.data.datasets import build_datasets
from megatron_mellama.data.loader import KEYS, document_ids_of, train_batches
from megatron_mellama.kernels import documents
from megatron_mellama.model import build_model
from megatron_mellama.training.engine import Engine

PACKED = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
VOCAB = 128
EOD = VOCAB - 1


def model_config(seq_length: int, *flags):
    return parse_config(["--model", "tiny", "--vocab-size", str(VOCAB), "--seq-length", str(seq_length),
                         "--max-position-embeddings", str(max(seq_length, 256)), *flags])


def random_documents(lengths, seed=0):
    """Documents of random tokens, each ending with the EOD."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(0, EOD, (n - 1,), generator=g), torch.tensor([EOD])]) for n in lengths]


def per_token_losses(model, tokens, labels, **packing):
    logits = model(tokens[None], **{k: v[None] for k, v in packing.items()})[0]
    return F.cross_entropy(logits.float(), labels, reduction="none")


def packing_of(tokens, *, eod_mask_loss=False):
    """megatron-core's loss mask and position ids of one sample, and the loader's document ids."""
    _, loss_mask, position_ids = _get_ltor_masks_and_position_ids(tokens, EOD, True, True, eod_mask_loss, False)
    return loss_mask, position_ids, document_ids_of(position_ids)


# --- (a) a packed sequence is its documents run alone ----------------------------------------------

@pytest.mark.parametrize("lengths", [(70, 150, 80), (5, 300, 1)])
def test_packed_tokens_get_the_losses_of_their_documents_alone(lengths):
    cfg = model_config(sum(lengths))
    model = build_model(cfg.model, seed=3)
    docs = random_documents(lengths)
    tokens = torch.cat(docs)
    # each token predicts the next one of the stream, across documents as Megatron-LM's samples do
    labels = torch.cat([tokens[1:], tokens[:1]])
    _, position_ids, document_ids = packing_of(tokens)
    assert torch.equal(position_ids, torch.cat([torch.arange(n) for n in lengths]))
    with torch.no_grad():
        packed = per_token_losses(model, tokens, labels, position_ids=position_ids, document_ids=document_ids)
        alone, start = [], 0
        for doc in docs:
            alone.append(per_token_losses(model, doc, labels[start:start + len(doc)]))
            start += len(doc)
        alone = torch.cat(alone)
        unmasked = per_token_losses(model, tokens, labels)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # without the masking the later documents see the earlier ones
    assert (unmasked - alone).abs().max() > 1e-3


def test_packed_gradients_are_the_sum_of_the_documents_alone():
    lengths = (70, 150, 80)
    cfg = model_config(sum(lengths))
    docs = random_documents(lengths, seed=1)
    tokens = torch.cat(docs)
    labels = torch.cat([tokens[1:], tokens[:1]])
    _, position_ids, document_ids = packing_of(tokens)

    packed_model = build_model(cfg.model, seed=3)
    per_token_losses(packed_model, tokens, labels, position_ids=position_ids, document_ids=document_ids).sum().backward()
    alone_model = build_model(cfg.model, seed=3)
    start = 0
    for doc in docs:
        per_token_losses(alone_model, doc, labels[start:start + len(doc)]).sum().backward()
        start += len(doc)
    for (name, p), q in zip(packed_model.named_parameters(), alone_model.parameters()):
        # of the whole tensor: summed in another order, single near-zero elements differ relatively more
        assert ((p.grad - q.grad).norm() / q.grad.norm()).item() <= 1e-5, name


def test_eod_mask_loss_leaves_the_eod_tokens_out_of_the_loss():
    cfg = parse_config(TINY + ["--seq-length", "32"] + PACKED)
    batch = global_batches(cfg, 1)[0]
    eods = batch["tokens"] == EOD
    assert eods.any() and not batch["loss_mask"][eods].any()
    # the engine's token-mean loss is the mean over the other tokens (the harness masks a few more)
    engine = Engine(cfg)
    loss = engine.evaluate(micro_batches_of(batch, cfg, 0, 1))
    model = engine.modules[0]
    with torch.no_grad():
        losses = torch.stack([per_token_losses(model, t, lab, position_ids=p, document_ids=d)
                              for t, lab, p, d in zip(batch["tokens"], batch["labels"], batch["position_ids"],
                                                      batch["document_ids"])])
    keep = batch["loss_mask"] > 0
    assert abs(loss - losses[keep].mean().item()) < 1e-5


# --- (b) the flags through the datasets and the loader -------------------------------------------

def test_flags_give_position_ids_restarting_after_each_eod(tmp_path):
    flags = ["--mock-data", "--data-cache-path", str(tmp_path), "--micro-batch-size", "4", "--global-batch-size", "4",
             "--train-iters", "2", "--num-workers", "0"]
    cfg = model_config(256, *flags, *PACKED)
    data = build_datasets(cfg)
    batch = next(train_batches(cfg, data.train, consumed_samples=0, dp_rank=0, dp_size=1))[0]
    eod = cfg.model.vocab_size - 1  # the mock data's EOD
    tokens, positions, docs = batch["tokens"], batch["position_ids"], batch["document_ids"]
    assert (tokens == eod).sum() >= 4  # several documents per sample
    for row, pos, doc in zip(tokens, positions, docs):
        after_eod = torch.cat([torch.tensor([True]), row[:-1] == eod])
        # a position restarts exactly at the token after an EOD (and at the sample's start)
        assert torch.equal(pos == 0, after_eod)
        assert torch.equal(pos[1:][~after_eod[1:]], pos[:-1][~after_eod[1:]] + 1)
        assert torch.equal(doc, torch.cumsum(after_eod, 0) - 1)
    assert not batch["loss_mask"][tokens == eod].any()

    plain = model_config(256, *flags)
    batch = next(train_batches(plain, build_datasets(plain).train, consumed_samples=0, dp_rank=0, dp_size=1))[0]
    assert tuple(batch) == KEYS  # without the flags the batch is as before


def test_reset_attention_mask_needs_reset_position_ids():
    with pytest.raises(ConfigError, match="--reset-attention-mask needs --reset-position-ids"):
        model_config(64, "--reset-attention-mask")


# --- (c) every layout computes the same steps ---------------------------------------------------

STEPS = 3
# TP2 with sequence parallel x PP2 under 1F1B, and DP2 FSDP, run packed conversations in
# tests/test_sft_dataset.py; here the other pipeline schedules
LAYOUTS = {
    "pp2-interleaved": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "pp2-zero-bubble": (2, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zero-bubble"]),
}
PACKED_TINY = TINY + ["--seq-length", "32"] + PACKED


@pytest.fixture(scope="module")
def packed_reference():
    return reference(PACKED_TINY, STEPS)


def _runs_here(name: str) -> bool:
    return "zero-bubble" not in name or torch_at_least(ZERO_BUBBLE_TORCH)


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """Every layout below, from one launch per world size: {name: every rank's results}."""
    return run_layouts_by_world({name: (world, PACKED_TINY + flags) for name, (world, flags) in LAYOUTS.items()
                                 if _runs_here(name)}, STEPS, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(not _runs_here(n), reason=f"zero-bubble needs torch {ZERO_BUBBLE_TORCH}"))
    for n in LAYOUTS])
def test_layout_with_packed_documents_equals_one_process(name, packed_reference, layout_runs):
    assert_matches(layout_runs[name], packed_reference, 1e-5)
    # the masking is on: the same batches without it train differently
    unmasked = reference(TINY + ["--seq-length", "32", "--reset-position-ids", "--eod-mask-loss"], 1)
    assert _rel(unmasked["losses"][0], packed_reference["losses"][0]) > 1e-4


# --- (d) no (seq, seq) mask -------------------------------------------------------------------------

def test_block_mask_is_the_one_create_block_mask_makes():
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        seq, block = int(torch.randint(20, 400, (1,), generator=g)), (16, 32, 128)[trial % 3]
        ids = torch.cumsum(torch.rand(3, seq, generator=g) < 0.03, dim=1)
        ours = documents.document_block_mask(ids, block)

        def same_document_causal(b, h, q, kv):
            return (kv <= q) & (ids[b, q] == ids[b, kv])

        theirs = create_block_mask(same_document_causal, 3, None, seq, seq, device="cpu", BLOCK_SIZE=block)
        for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), (seq, block, name)
        assert torch.equal(ours.to_dense(), theirs.to_dense())


@pytest.mark.slow
def test_compiled_flex_attention_with_the_block_mask_matches_the_tiled_path():
    # flex attention is what CUDA runs; compiled on the CPU it runs forward only, which is enough
    # to see that it reads the block mask's tiles as intended
    # a fresh compile: after another test's shapes, dynamo recompiles with dynamic shapes, which
    # inductor's CPU flex template cannot build (a C++ compile error, torch 2.13)
    torch.compiler.reset()
    g = torch.Generator().manual_seed(0)
    ids = torch.cumsum(torch.rand(2, 300, generator=g) < 0.02, dim=1)
    q, k, v = (torch.randn(2, h, 300, 16, generator=g) for h in (4, 2, 2))
    mask = documents.document_block_mask(ids)
    flex = documents._compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=True)
    tiled = documents.attention_by_tiles(q, k, v, ids, gqa=True)
    torch.testing.assert_close(flex, tiled, rtol=1e-5, atol=1e-5)


def test_tiled_attention_equals_dense_masked_attention_with_gradients():
    g = torch.Generator().manual_seed(0)
    seq = 300
    ids = torch.cumsum(torch.rand(2, seq, generator=g) < 0.02, dim=1)
    q, k, v = (torch.randn(2, h, seq, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    tiled = documents.attention(q, k, v, documents.Documents(ids, None))
    grads = torch.autograd.grad(tiled.square().sum(), (q, k, v))
    position = torch.arange(seq)
    dense = (position[None, :, None] >= position[None, None, :]) & (ids[:, :, None] == ids[:, None, :])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], enable_gqa=True)
    torch.testing.assert_close(tiled, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_flex_path_gets_a_block_mask_of_tiles_only(monkeypatch):
    monkeypatch.setattr(documents, "FLEX_DEVICE_TYPES", ("cpu",))
    ids = document_ids_of(torch.cat([torch.arange(n) for n in (3000, 5000, 192)])[None])
    mask = documents.document_mask(ids).block_mask
    assert isinstance(mask, BlockMask)
    tiles = 8192 // documents.BLOCK
    assert mask.kv_indices.numel() == tiles * tiles  # int32 per tile: 16 KiB, not 8192 x 8192


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.slow
def test_a_long_packed_micro_batch_never_holds_a_sequence_squared_tensor():
    seq = 8192
    cfg = model_config(seq)
    model = build_model(cfg.model, seed=3)
    tokens = torch.cat(random_documents((3000, 5000, 192)))
    _, position_ids, document_ids = packing_of(tokens)
    with LargestTensor() as largest:
        loss = model(tokens[None], torch.roll(tokens, -1)[None], position_ids=position_ids[None],
                     document_ids=document_ids[None])
        loss.backward()
    # one (seq, seq) fp32 mask or score matrix per head would be seq * seq elements (256 MiB);
    # a tile of queries against every key is heads x BLOCK x seq
    assert largest.numel <= cfg.model.num_attention_heads * documents.BLOCK * seq < seq * seq // 4
