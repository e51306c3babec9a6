"""What only a CUDA device can show, run by `benchmarks/gpu_check.sh` on a first GPU (skipped
without one): compiled flex attention under a context-parallel rank's BlockMask, forward and
backward, in bf16, built without a host sync; the fused loss's per-row sums repeating bit for bit;
every private torch name resolving on the GPU machine's torch release."""

import pytest
import torch
import torch.nn.functional as F

from megatron_mellama import torch_private
from megatron_mellama.kernels.fused_loss import linear_cross_entropy
from megatron_mellama.parallel.context import ContextParallelAttention, chunk_document_mask, chunk_positions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_every_private_torch_name_resolves_on_this_torch():
    assert torch_private.unresolved() == [], torch.__version__


def _dense_reference(q, k, v, ids):
    position = torch.arange(ids.shape[1], device=ids.device)
    mask = (position[None, :, None] >= position[None, None, :]) & (ids[:, :, None] == ids[:, None, :])
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None], enable_gqa=True)


# seq 8192 under CP 2: chunks of 2048, whole tiles; 8200 under CP 4: chunks of 1025, partial tiles
# and a query tile holding the end of one chunk and the start of the other
@pytest.mark.parametrize("cp,seq", [(2, 8192), (4, 8200)])
def test_compiled_flex_attention_of_each_cp_rank_equals_dense_attention_in_bf16(cp, seq, monkeypatch):
    torch.compiler.reset()  # each shape compiled as training compiles it: once, static
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.cumsum(torch.rand(1, seq, generator=g, device="cuda") < 1e-3, dim=1)
    q, k, v = (torch.randn(1, h, seq, 64, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 2, 2))
    weight = torch.randn(1, 8, seq, 64, generator=g, device="cuda")
    want = _dense_reference(q, k, v, ids)
    for rank in range(cp):
        held = chunk_positions(seq, cp, rank).to("cuda")
        torch.cuda.set_sync_debug_mode("error")  # the mask is built once per micro-batch: no host read
        try:
            mask = chunk_document_mask(ids, cp, rank)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        attend = ContextParallelAttention(None, cp, rank, seq)
        gathered = iter((k, v))  # one process plays the rank: the all-gather hands over every key
        monkeypatch.setattr(attend, "_gather_in_order", lambda t, seq_len: next(gathered))
        got = attend(q[:, :, held], k[:, :, held], v[:, :, held], mask)
        torch.testing.assert_close(got.float(), want[:, :, held], rtol=2e-2, atol=2e-2)
        got_grads = torch.autograd.grad((got.float() * weight[:, :, held]).sum(), (q, k, v))
        want_grads = torch.autograd.grad((want[:, :, held] * weight[:, :, held]).sum(), (q, k, v), retain_graph=True)
        for got_grad, want_grad in zip(got_grads, want_grads):
            torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=5e-2, atol=5e-2)


def test_per_row_loss_sums_repeat_bit_for_bit_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(8, 512, 1024, generator=g, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(32000, 1024, generator=g, device="cuda", dtype=torch.bfloat16) / 32
    labels = torch.randint(0, 32000, (8, 512), generator=g, device="cuda")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            runs = [linear_cross_entropy(hidden, weight, labels, per_row=True) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert all(torch.equal(r, runs[0]) for r in runs)
