"""What every attention kernel shares: tile loads and stores, the scores, the launch geometry,
and the buffer allocator (one place, so tests can poison every output)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

def new_buffer(shape, *, device, dtype) -> Tensor:
    """Every tensor a kernel writes is allocated here, uninitialised."""
    return torch.empty(shape, device=device, dtype=dtype)


def scale_kind(scale) -> int:
    """SCALE_KIND of a scale tensor (contiguous) or None: 0 a float, 1 a tensor [], 2 a tensor [H]."""
    return 0 if scale is None else (2 if scale.dim() == 1 else 1)


def map_strides(t) -> tuple:
    """(stride over b, stride over h) of a bias or mask [H, N, N] / [B, H, N, N] whose [N, N]
    slices are contiguous, 0 over a broadcast dim; (0, 0) for None."""
    if t is None:
        return 0, 0
    full = t if t.dim() == 4 else t.unsqueeze(0)
    return (0 if full.shape[0] == 1 else full.stride(0)), (0 if full.shape[1] == 1 else full.stride(1))


@triton.jit
def mm(a, b, PRECISION: tl.constexpr):
    """a @ b, fp32 accumulation. PRECISION: "half" (fp16/bf16 operands), "tf32" or "ieee" (fp32),
    "upcast" (bf16 multiplied in fp32: the CPU interpreter mis-multiplies bfloat16)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISION == "half":
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def program(N, H, BLOCK: tl.constexpr):
    """(block index along the sequence, b·h, b, h): a 1-D grid, sequence blocks fastest (a head's
    programs share its K/V in L2), head indices int64 (offsets past 2³¹ do not wrap)."""
    blocks = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    bh = (pid // blocks).to(tl.int64)
    return pid % blocks, bh, bh // H, bh % H


@triton.jit
def head_scale(SCALE, scale_value, h, SCALE_KIND: tl.constexpr):
    """The softmax scale of head h: 0 a float, 1 a tensor [], 2 a tensor [H]."""
    if SCALE_KIND == 0:
        return scale_value
    elif SCALE_KIND == 1:
        return tl.load(SCALE).to(tl.float32)
    else:
        return tl.load(SCALE + h).to(tl.float32)


@triton.jit
def load_rows(ptrs, ok, MASKED: tl.constexpr):
    """A [rows, D] tile; rows past the sequence read 0 when MASKED."""
    if MASKED:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def load_vec(ptrs, ok, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=ok, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def store_rows(ptrs, x, ok, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=ok[:, None])
    else:
        tl.store(ptrs, x)


@triton.jit
def map_tile(MAP, b, h, qi, ki, N, stride_b, stride_h, MASK_Q: tl.constexpr, MASK_K: tl.constexpr):
    """MAP[b, h, qi, ki] in fp32 of a bias or mask whose last two dims are contiguous [N, N]
    (stride 0 on a broadcast b or h), for broadcastable index tensors; 0 past the sequence."""
    ptrs = MAP + b * stride_b + h * stride_h + qi * N + ki
    if MASK_Q:
        return tl.load(ptrs, mask=(qi < N) & (ki < N), other=0.0).to(tl.float32)
    elif MASK_K:
        return tl.load(ptrs, mask=ki < N, other=0.0).to(tl.float32)
    else:
        return tl.load(ptrs).to(tl.float32)


@triton.jit
def scores(qk, qi, ki, scale_log2, b, h, N, BIAS, sbb, sbh,
           HAS_BIAS: tl.constexpr, DIAGONAL_MASK: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr):
    """s = scale·q·k + bias in log2 units for query / key indices qi, ki (broadcastable to qk):
    −∞ for keys past the sequence (MASK_K) and on the masked diagonal. MASK_Q / MASK_K: whether
    qi / ki may run past the sequence (a tail tile); full tiles skip every mask."""
    s = qk * scale_log2
    if HAS_BIAS:
        s += map_tile(BIAS, b, h, qi, ki, N, sbb, sbh, MASK_Q, MASK_K) * 1.4426950408889634
    if MASK_K:
        s = tl.where(ki < N, s, float("-inf"))
    if DIAGONAL_MASK:
        s = tl.where(qi != ki, s, float("-inf"))
    return s
