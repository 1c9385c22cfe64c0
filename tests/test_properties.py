"""Properties of the MGiT loss that must hold for any batch (hypothesis draws the shapes)."""
import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mgit_fast import reference

batches = st.tuples(
    st.integers(1, 9),  # rows
    st.integers(2, 40),  # classes
    st.floats(0.1, 30.0),  # logit spread
    st.floats(0.0, 1.0),  # label smoothing
    st.floats(0.25, 4.0),  # temperature
    st.integers(0, 2**31 - 1),  # seed of the values
)


def draw(rows, classes, spread, seed):
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn(rows, classes, generator=g, dtype=torch.float64) * spread
    za = torch.randn(rows, classes, generator=g, dtype=torch.float64) * spread
    y = torch.randint(0, classes, (rows,), generator=g)
    y[torch.rand(rows, generator=g) < 0.3] = -100
    return zp, za, y


@settings(max_examples=60, deadline=None)
@given(batches)
def test_loss_properties(batch):
    rows, classes, spread, smoothing, temperature, seed = batch
    zp, za, y = draw(rows, classes, spread, seed)
    out = reference.mgit_loss(zp, za, y, label_smoothing=smoothing, temperature=temperature, js_weight=0.3)
    kept = y != -100

    # the cross-entropies are torch's (or 0 when every row is ignored)
    for logits, ce in ((zp, out.ce_primary), (za, out.ce_auxiliary)):
        expected = F.cross_entropy(logits, y, label_smoothing=smoothing) if kept.any() else torch.zeros(())
        torch.testing.assert_close(ce, expected.to(ce.dtype), rtol=1e-10, atol=1e-12)
    # JS: bounded, symmetric, blind to per-row shifts of the logits
    assert -1e-12 <= float(out.js) <= math.log(2) + 1e-12
    swapped = reference.mgit_loss(za, zp, y, label_smoothing=smoothing, temperature=temperature)
    torch.testing.assert_close(swapped.js, out.js, rtol=1e-9, atol=1e-12)
    shift = torch.randn(rows, 1, dtype=torch.float64) * 100
    shifted = reference.mgit_loss(zp + shift, za - shift, y, label_smoothing=smoothing, temperature=temperature)
    torch.testing.assert_close(shifted.js, out.js, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(out.loss, out.ce_primary + out.ce_auxiliary + 0.3 * out.js)
