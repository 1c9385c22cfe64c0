"""Fused attention, forward and backward (flash-style), with the small-data variants.

Math, per batch b and head h, for queries m and keys n of a sequence of N tokens, M the
multiplicative mask (IBiT; M ≡ 1 without one):

    s[m, n] = scale_h · (q_m · k_n) + bias[b, h, m, n]        (−∞ where m = n if diagonal_mask)
    p[m, :] = softmax(s[m, :]),   a[m, n] = p[m, n] · M[b, h, m, n]   (no renormalisation)
    out_m = Σ_n a[m, n] · v_n,    lse_m = log Σ_n exp s[m, n]          (the unmasked softmax's)

and, with dp = dout·vᵀ, δ_m = dout_m · out_m, ds = p ⊙ (M ⊙ dp − δ):

    dv_n = Σ_m p M dout_m    dk_n = scale_h Σ_m ds q_m    dq_m = scale_h Σ_n ds k_n
    dbias = ds    dM = p ⊙ dp    dscale_h = Σ_{b, m, n} ds · (q_m · k_n)

Layouts: q, k, v, out are [B, H, N, D] operands with unit stride on D, given to the kernels as a
pointer per operand and the strides they share (`common.Heads`), so a packed qkv [B, N, 3·H·D]
is read in place and the packed output [B, N, H·D] written in place. bias and mask
are [H, N, N] or [B, H, N, N] (1 broadcasts over B and H), any float dtype (read as fp32).

Files by role: `forward.py`, `backward.py` (dq and dk/dv kernels), `shared.py` (the gradient of
a bias or mask shared over the batch), `planning.py` (`plan()`, the one
place that picks tiles and paths), `op.py` (entry points, autograd, custom ops), `common.py`.
"""
from .backward import backward_into
from .common import Heads, new_buffer, packed, unpacked
from .forward import forward_into
from .op import attention, attention_bwd, attention_fwd, attention_qkvpacked
from .planning import HEAD_DIMS, plan, tf32_allowed
from .shared import shared_grad

__all__ = [
    "HEAD_DIMS", "attention", "attention_bwd", "attention_fwd", "attention_qkvpacked", "backward_into", "forward_into",
    "Heads", "new_buffer", "packed", "plan", "shared_grad", "tf32_allowed", "unpacked",
]
