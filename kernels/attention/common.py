"""What every attention kernel shares: tile loads and stores, the scores, the launch geometry,
and the buffer allocator (one place, so tests can poison every output)."""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

def new_buffer(shape, *, device, dtype, strides=None) -> Tensor:
    """Every tensor a kernel writes is allocated here, uninitialised (contiguous, or with dense
    `strides`)."""
    if strides is None:
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.empty_strided(shape, strides, device=device, dtype=dtype)


class Heads(NamedTuple):
    """[B, H, N, D] operands as the kernels take them: one tensor per operand whose data pointer
    starts it, and the (b, h, n) strides they share (unit stride on D). No views are built."""

    tensors: Tuple[Tensor, ...]
    shape: Tuple[int, int, int, int]
    strides: Tuple[int, int, int]


def packed(t: Tensor, num_heads: int, parts: int) -> Heads:
    """The `parts` operands side by side in a contiguous [B, N, parts·H·D] tensor (a qkv: 3, an
    output: 1)."""
    B, N, width = t.shape
    w = width // parts
    return Heads(tuple(t[..., i * w:] if i else t for i in range(parts)), (B, num_heads, N, w // num_heads),
                 (t.stride(0), w // num_heads, t.stride(1)))


def unpacked(*tensors: Tensor) -> Heads:
    """[B, H, N, D] tensors sharing strides."""
    return Heads(tensors, tuple(tensors[0].shape), tensors[0].stride()[:3])


def scale_stride(scale) -> int:
    """The stride over heads of a scale tensor (contiguous): 0 for [], 1 for [H]; −1 for None."""
    return -1 if scale is None else (1 if scale.dim() == 1 else 0)


def map_layout(t) -> int:
    """How a bias or mask [H, N, N] / [B|1, H|1, N, N] laid out as `op._map` leaves it varies:
    2·(a slice per batch) + (a slice per head), a dim of size 1 or stride 0 broadcast; −1 for
    None (the tuning key tells an absent map from a broadcast one)."""
    if t is None:
        return -1
    full = t if t.dim() == 4 else t.unsqueeze(0)
    return 2 * (full.shape[0] > 1 and full.stride(0) != 0) + (full.shape[1] > 1 and full.stride(1) != 0)


def constexprs(D: int, precision: str, diagonal_mask: bool, bias, mask) -> dict:
    """The constexprs every attention kernel takes besides its tiles."""
    return dict(D=D, DIAGONAL_MASK=diagonal_mask, PRECISION=precision, BIAS_LAYOUT=map_layout(bias),
                MASK_LAYOUT=map_layout(mask))


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
def head_scale(SCALE, scale_value, scale_stride, h):
    """The softmax scale of head h: `scale_value`, or a tensor [] / [H] (stride 0 / 1 over heads)."""
    if SCALE is None:
        return scale_value
    else:
        return tl.load(SCALE + h * scale_stride).to(tl.float32)


@triton.jit
def map_offset(b, h, H, N, LAYOUT: tl.constexpr):
    """Where head (b, h)'s [N, N] slice starts in a map of `map_layout` LAYOUT."""
    return ((b * H if LAYOUT == 3 else b) * N * N if LAYOUT >= 2 else 0) + (h * N * N if LAYOUT % 2 == 1 else 0)


@triton.jit
def tile(P, idx, stride, D: tl.constexpr):
    """Pointers of the [len(idx), D] rows idx of an operand with row stride `stride`."""
    return P + idx[:, None] * stride + tl.arange(0, D)[None, :]


@triton.jit
def load(ptrs, ok, MASKED: tl.constexpr):
    """The values at ptrs; where `ok` (broadcast to ptrs) is false 0, when MASKED."""
    if MASKED:
        return tl.load(ptrs, mask=ok, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def store(ptrs, x, ok, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, x, mask=ok)
    else:
        tl.store(ptrs, x)


@triton.jit
def map_tile(MAP, qi, ki, N, MASK_Q: tl.constexpr, MASK_K: tl.constexpr):
    """MAP[qi, ki] in fp32 of one head's contiguous [N, N] slice of a bias or mask, for
    broadcastable index tensors; 0 past the sequence."""
    ptrs = MAP + qi * N + ki
    if MASK_Q:
        return tl.load(ptrs, mask=(qi < N) & (ki < N), other=0.0).to(tl.float32)
    elif MASK_K:
        return tl.load(ptrs, mask=ki < N, other=0.0).to(tl.float32)
    else:
        return tl.load(ptrs).to(tl.float32)


@triton.jit
def scores(qk, qi, ki, scale_log2, N, BIAS, DIAGONAL_MASK: tl.constexpr, MASK_Q: tl.constexpr, MASK_K: tl.constexpr):
    """s = scale·q·k + bias in log2 units for query / key indices qi, ki (broadcastable to qk),
    BIAS at the head's slice: −∞ for keys past the sequence (MASK_K) and on the masked diagonal.
    MASK_Q / MASK_K: whether qi / ki may run past the sequence (a tail tile); full tiles skip
    every mask."""
    s = qk * scale_log2
    if BIAS is not None:
        s += map_tile(BIAS, qi, ki, N, MASK_Q, MASK_K) * 1.4426950408889634
    if MASK_K:
        s = tl.where(ki < N, s, float("-inf"))
    if DIAGONAL_MASK:
        s = tl.where(qi != ki, s, float("-inf"))
    return s
