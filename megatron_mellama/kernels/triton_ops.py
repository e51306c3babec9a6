"""The `triton` backend: fused RMSNorm, rotary q/k, SwiGLU, and the two pieces of the chunked
cross-entropy (row logsumexp, and the logits gradient written in place).

Same names, signatures, shapes and dtypes as `reference.py`, which is the contract. Every kernel
loads its inputs, computes in fp32 and casts only when storing: that is what the GPU wants, and
Triton's interpreter (how these kernels run on the CPU, with TRITON_INTERPRET=1 set before this
module is imported) gives wrong results for arithmetic done directly on bf16 values.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# torch.compile is not claimed for these autograd Functions around Triton launches: the compiled
# blocks keep the reference's element-wise operations, which Inductor fuses with their neighbours
COMPILE_SAFE = frozenset()


def unavailable_reason(device_type: str) -> str | None:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on the CPU Triton runs only under its interpreter: set TRITON_INTERPRET=1"
    return None


def _num_warps(block: int) -> int:
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def _num_programs(device: torch.device, rows: int) -> int:
    # one program per SM for the weight-gradient reduction: each keeps a (hidden,) fp32 partial sum
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(rows, sms))


# ---------------------------------------------------------------- RMSNorm

@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # the reference rounds the normalised value to x's dtype before the weight multiplies it
    h = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * h).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols,
                  rows_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    # advance 64-bit pointers rather than multiply the (int32) loop index by a stride
    dy_ptr = DY + start.to(tl.int64) * stride_dy
    x_ptr = X + start.to(tl.int64) * stride_x
    dx_ptr = DX + start.to(tl.int64) * stride_dx
    for row in range(start, end):
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        h = x * rstd
        # the rounding of h to x's dtype is treated as the identity, as autograd does for a cast
        dw += dy * h.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w
        dx = rstd * (g - h * (tl.sum(g * h, axis=0) / n_cols))
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dy_ptr += stride_dy
        x_ptr += stride_x
        dx_ptr += stride_dx
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        weight = weight.contiguous()
        rows, cols = x2.shape
        y = torch.empty((rows, cols), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(cols)
        if rows > 0:
            _rms_norm_fwd[(rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), cols, eps,
                                   BLOCK=block, num_warps=_num_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy = dy.reshape(rows, cols).contiguous()
        dx = torch.empty_like(x2)
        programs = _num_programs(x2.device, rows)
        partial = torch.zeros((programs, cols), dtype=torch.float32, device=x2.device)
        if rows > 0:
            block = triton.next_power_of_2(cols)
            _rms_norm_bwd[(programs,)](dy, x2, weight, rstd, dx, partial, dy.stride(0), x2.stride(0),
                                       dx.stride(0), rows, cols, triton.cdiv(rows, programs),
                                       BLOCK=block, num_warps=_num_warps(block))
        return dx.view(ctx.shape), partial.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


# ---------------------------------------------------------------- rotary embeddings

@triton.jit
def _rotary(X, Y, COS, SIN, heads, seq, half,
            sx_b, sx_h, sx_s, sx_d, sy_b, sy_h, sy_s, sy_d, sc_s, sc_d,
            BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per (batch, head) and block of positions; the two halves of head_dim are loaded
    # separately, so rotate_half is a swap of registers rather than a gather
    bh = tl.program_id(0)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    s = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (s[:, None] < seq) & (d[None, :] < half)

    x_off = b * sx_b + h * sx_h + s[:, None] * sx_s + d[None, :] * sx_d
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + half * sx_d, mask=mask, other=0.0).to(tl.float32)
    c_off = s[:, None] * sc_s + d[None, :] * sc_d
    cos1 = tl.load(COS + c_off, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + c_off + half * sc_d, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + c_off, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + c_off + half * sc_d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # transpose of x -> x*cos + rotate_half(x)*sin: g*cos + cat(g2*sin2, -g1*sin1)
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2

    y_off = b * sy_b + h * sy_h + s[:, None] * sy_s + d[None, :] * sy_d
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + half * sy_d, y2.to(Y.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    batch, heads, seq, head_dim = x.shape
    # a transposed (batch, seq, heads, head_dim) view is read through its strides, not copied
    y = torch.empty((batch, heads, seq, head_dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_s = min(triton.next_power_of_2(seq), 16)
    block_d = triton.next_power_of_2(head_dim // 2)
    grid = (batch * heads, triton.cdiv(seq, block_s))
    _rotary[grid](x, y, cos, sin, heads, seq, head_dim // 2, *x.stride(), *y.stride(), *cos.stride(),
                  BACKWARD=backward, BLOCK_S=block_s, BLOCK_D=block_d)
    return y


class _RotaryQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        if cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        # the tables as given, shared by every layer: a converted copy kept here would be one more
        # (positions x head_dim) table per layer and micro-batch
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = None if dq is None else _rotate(dq, cos, sin, True)
        dk = None if dk is None else _rotate(dk, cos, sin, True)
        return dq, dk, None, None


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    if q.shape[-1] % 2 or cos.shape[0] < q.shape[2] or cos.shape[-1] != q.shape[-1]:
        raise ValueError(f"rotary tables {tuple(cos.shape)} do not fit q {tuple(q.shape)}")
    if cos.dtype != sin.dtype:
        cos, sin = cos.float(), sin.float()
    # the kernel reads the tables in their own dtype (fp32, or the compute dtype FSDP2's layers
    # take them in) and computes in fp32 registers
    return _RotaryQK.apply(q, k, cos, sin)


# ---------------------------------------------------------------- SwiGLU

_SWIGLU_BLOCK = 1024


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig))
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        if n > 0:
            _swiglu_fwd[(triton.cdiv(n, _SWIGLU_BLOCK),)](gate, up, y, n, BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n > 0:
            _swiglu_bwd[(triton.cdiv(n, _SWIGLU_BLOCK),)](dy, gate, up, dg, du, n, BLOCK=_SWIGLU_BLOCK)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu needs gate and up alike, got {gate.shape}/{gate.dtype} and {up.shape}/{up.dtype}")
    return _SwiGLU.apply(gate, up)


# ---------------------------------------------------------------- cross-entropy pieces

def _vocab_block(cols: int) -> int:
    return min(triton.next_power_of_2(cols), 4096)


@triton.jit
def _logsumexp_rows(X, OUT, stride_r, stride_c, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_r
    cols = tl.arange(0, BLOCK)
    # running max and sum of exp(x - max) over column blocks: one pass over the row
    m = float("-inf")
    acc = 0.0
    for start in range(0, n_cols, BLOCK):
        idx = start + cols
        x = tl.load(x_row + idx.to(tl.int64) * stride_c, mask=idx < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(OUT + row, m + tl.log(acc))


def logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    rows, cols = logits.shape
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows > 0 and cols > 0:
        block = _vocab_block(cols)
        _logsumexp_rows[(rows,)](logits, out, logits.stride(0), logits.stride(1), cols,
                                 BLOCK=block, num_warps=_num_warps(block))
    elif rows > 0:
        out.fill_(float("-inf"))
    return out


@triton.jit
def _cross_entropy_grad(X, LSE, LABELS, SCALE, stride_r, stride_c, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_r
    lse = tl.load(LSE + row)
    label = tl.load(LABELS + row)
    scale = tl.load(SCALE + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        idx = start + cols
        mask = idx < n_cols
        ptrs = x_row + idx.to(tl.int64) * stride_c
        p = tl.exp(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - lse)
        # a label outside [0, n_cols) (ignored, or on another vocabulary shard) matches no column
        p = tl.where(idx.to(tl.int64) == label, p - 1.0, p)
        tl.store(ptrs, (p * scale).to(X.dtype.element_ty), mask=mask)


def cross_entropy_grad(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
    """d loss / d logits, written over `logits` (its dtype) and returned: the chunk needs no second buffer."""
    rows, cols = logits.shape
    if rows > 0 and cols > 0:
        lse = lse.to(torch.float32).contiguous()
        labels = labels.to(torch.int64).contiguous()
        scale = scale.to(torch.float32).contiguous()
        block = _vocab_block(cols)
        _cross_entropy_grad[(rows,)](logits, lse, labels, scale, logits.stride(0), logits.stride(1), cols,
                                     BLOCK=block, num_warps=_num_warps(block))
    return logits
