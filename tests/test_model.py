"""bench/model.py: the dispatch-mode counter, the reduced-size byte recording and its scaling to
a larger size, and the table, on small shapes (CPU, Triton interpreter)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU process: its kernels are compiled ones
    pytest.skip("bench/model.py runs the kernels in Triton's interpreter (run with TRITON_INTERPRET=1)",
                allow_module_level=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("mgit_bench_model", os.path.join(ROOT, "bench", "model.py"))
model = sys.modules.setdefault("mgit_bench_model", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(model)

META = torch.device("meta")
H100 = model.insp.TARGETS["sm_90a"]


def _counted(fn):
    counter = model.OpCounter()
    with counter:
        fn()
    return counter.ops


def test_counter_matmul_inplace_fill_and_views():
    M, K, N = 5, 7, 3
    a, b = torch.empty(M, K, device=META), torch.empty(K, N, device=META)
    c = torch.empty(M, N, device=META)
    ops = _counted(lambda: (a @ b, c.t(), c.add_(c.t().t()), c.zero_(), c.expand(4, M, N).sum(0)))
    assert [o.name for o in ops] == ["mm", "add_", "zero_", "sum"]  # the transposes and the expand are views
    mm, add, zero, total = ops
    assert (mm.read, mm.write, mm.launches) == ((M * K + K * N) * 4, M * N * 4, 1)
    assert mm.tc_flops + mm.fma_flops == 2 * M * N * K
    assert (add.read, add.write) == (2 * M * N * 4, M * N * 4)  # in place: reads its target
    assert (zero.read, zero.write) == (0, M * N * 4)  # a fill does not read
    assert total.read == M * N * 4  # a broadcast input counts its unique bytes


def test_counter_keeps_only_writes_into_given_storages():
    grad = torch.zeros(10)
    other = torch.zeros(10)
    counter = model.OpCounter()
    counter.only_writes_to = {model._storage_key(grad)}
    with counter:
        other.add_(1.0)
        grad[2:].add_(other[2:])
    assert [(o.name, o.read, o.write) for o in counter.ops] == [("add_", 64, 32)]


def test_multi_tensor_apply_launches():
    chunk = model.MTA_CHUNK
    assert model.mta_launches([chunk * model.MTA_MAX_BLOCKS], 1) == 1
    assert model.mta_launches([chunk * model.MTA_MAX_BLOCKS + 1], 1) == 2
    assert model.mta_launches([1] * 110, 1) == 1
    assert model.mta_launches([1] * 111, 1) == 2
    assert model.mta_launches([1] * 37, 4) == 2  # depth 4 (AdamW): 36 tensors per launch


def _predicted_vs_recorded(small, third):
    """HBM bytes of each launch of `third` predicted from `small`'s per-argument coverage, and recorded."""
    out = []
    for s, t in zip(small, third):
        assert s.kernel == t.kernel
        regions = [(names, 0, r["size"]) for names, r in t.regions.items()]
        predicted = model.apply_coverage(model.coverage(s), regions)["hbm"]
        recorded = sum(r["read"] + r["write"] + 2 * r["atomic"] for r in t.regions.values())
        out.append((t.kernel, predicted, recorded))
    return out


@pytest.mark.parametrize("variant", ["plain", "bias", "lsa"])
def test_attention_bytes_scale_to_a_third_size(monkeypatch, variant):
    from mgit_fast.kernels.attention import planning

    # one group per gradient slice at both sizes: plain stores (at B·H = 1 there is no atomic to
    # compare an atomic with)
    monkeypatch.setattr(planning, "SHARED_GRAD_PROGRAMS", 1)
    N, D = 33, 16
    small = model.run_recorded(lambda: model.attention_part(1, N, 1, D, variant))
    third = model.run_recorded(lambda: model.attention_part(3, N, 2, D, variant))
    launches = 4 if variant == "bias" else 3  # a shared bias's gradient: the grouped pass
    assert [r.kernel for r in small] == [r.kernel for r in third] and len(small) == launches
    for kernel, predicted, recorded in _predicted_vs_recorded(small, third):
        assert recorded > 0
        assert abs(predicted - recorded) <= 0.02 * recorded, (kernel, predicted, recorded)


def test_loss_bytes_scale_to_a_third_size():
    small = model.run_recorded(lambda: model.loss_part(4, 37))
    third = model.run_recorded(lambda: model.loss_part(12, 37))
    for kernel, predicted, recorded in _predicted_vs_recorded(small, third):
        assert abs(predicted - recorded) <= 0.02 * recorded, (kernel, predicted, recorded)


def test_recording_reads_each_logit_once():
    """Independent of the kernels' code: the forward must read both [B, C] logits completely."""
    B, C = 6, 37
    fwd = model.run_recorded(lambda: model.loss_part(B, C))[0]
    assert sum(r["read"] for r in fwd.regions.values()) >= 2 * B * C * 2


def test_torch_update_counts_norms_clipping_and_fused_adamw():
    ops = model.torch_update(16, 2)
    n = model.update_size(16, 2)
    per_param = sum(o.read + o.write for o in ops) / n
    names = {o.name for o in ops}
    assert {"_foreach_norm", "_foreach_mul_", "_fused_adamw_"} <= names
    # norm 4 + clip 8 + AdamW 28 (p, g, m, v read; p, m, v written) per parameter; mixing the
    # paired head: g_P scaled in place (8), μ·g_A into a new list (8), added into g_P (12)
    head = sum(p.numel() for p in model._update_models(16, 2, False, device="meta", real=False)[0].head.parameters())
    expected = 40.0 + 28.0 * head / n
    assert abs(per_param - expected) < 0.05, (per_param, expected)


def test_table_builds_for_small_shapes(tmp_path):
    parts = [("attention", "tiny bf16 plain", dict(B=4, N=17, H=2, D=16, variant="plain")),
             ("loss", "B=8 C=10 bf16", dict(B=8, C=10))]
    built = model.build(H100, parts=parts, facts={})
    assert built["modeled"] is True
    attention, loss = built["parts"]
    assert [k["kernel"] for k in attention["kernels"]][0] == "attention_fwd"
    assert set(attention["peers"]) == {"eager", "sdpa"} and set(loss["peers"]) == {"eager"}
    for p in built["parts"]:
        assert p["total"]["bytes"] > 0 and p["total"]["modeled_us"] > 0
        for peer in p["peers"].values():
            assert peer["bytes"] > 0 and peer["launches"] >= 1
    # the eager attention materialises [B, H, N, N] scores: more bytes than ours
    assert attention["peers"]["eager"]["bytes"] > attention["total"]["bytes"]
    text = model.format_markdown(built)
    assert "modeled" in text and "tiny bf16 plain" in text
    compared = model.format_comparison(built, built)
    assert compared.count("→") >= 4 * len(parts)


def test_full_size_capture_regions_match_a_direct_recording():
    """The capture path (kernels not run, argument sizes from the real tensors) predicts what
    the interpreter records at that size."""
    N, D = 33, 16
    full, torch_ops = model.run_full(lambda: model.attention_part(3, N, 2, D, "bias", real=False), H100)
    # B·H = 2: the shared bias's gradient is summed with atomics at both sizes
    small = model.run_recorded(lambda: model.attention_part(2, N, 1, D, "bias"))
    direct = model.run_recorded(lambda: model.attention_part(3, N, 2, D, "bias"))
    combined = model.combine(full, [small])
    assert [c["launch"].kernel for c in combined] == [r.kernel for r in direct]
    for c, r in zip(combined, direct):
        recorded = sum(x["read"] + x["write"] + 2 * x["atomic"] for x in r.regions.values())
        assert abs(c["bytes"]["hbm"] - recorded) <= 0.02 * recorded, (r.kernel, c["bytes"]["hbm"], recorded)
    assert any(op.name in ("zeros", "zero_") for op in torch_ops)  # the zeroed bias-gradient buffer
