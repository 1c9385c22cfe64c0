"""The public API against float64 on the GPU, one JSON line per case, flushed as it is written.

    python3 bench/correctness.py OUT.jsonl [--small]

Default: the benchmark shapes in bf16: attention (plain, LSA, [H, N, N] bias, [B, H, N, N] bias,
IBiT mask, Gaussian mixture; output and every gradient), the loss grid (25 % ignored labels;
four random upstream weights), the update (ViT pairs, three steps, the parameter changes
against the torch backend in float64). ``--small``: one small launch of every kernel path
(fp32/fp16/bf16, head dims 16-128, one launch with B·H > 2·SMs), for compute-sanitizer.
With MGIT_BENCH_DRY=1 (and TRITON_INTERPRET=1): tiny shapes on the CPU.
A failed case is a line with ``"ok": false``; the exit code is 1 if any failed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import ATTENTION_SHAPES, DEVICE, LOSS_BATCHES, LOSS_CLASSES, UPDATE_MODELS  # noqa: E402

from mgit_fast import MultiGradientAdamW, ViT, functional  # noqa: E402
from mgit_fast.reference import GaussianMixture  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
VARIANTS = ["plain", "lsa", "bias", "batch_bias", "mask", "gmm"]


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def attention_case(B, N, H, D, variant, dtype):
    """Relative errors of the output and every gradient, bf16/fp16/fp32 kernel vs float64."""
    g = int(round((N - 1) ** 0.5))
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE, dtype=torch.float64)
    extra = {}
    if variant == "lsa":
        extra = dict(scale=torch.rand(H, device=DEVICE, dtype=torch.float64) * 0.3 + 0.05, diagonal_mask=True)
    elif variant in ("bias", "batch_bias"):
        extra = dict(bias=torch.randn(*((B,) if variant == "batch_bias" else ()), H, N, N, device=DEVICE,
                                      dtype=torch.float64) * 0.5)
    elif variant == "mask":
        extra = dict(mask=torch.rand(H, N, N, device=DEVICE, dtype=torch.float64) + 0.5,
                     bias=torch.randn(H, N, N, device=DEVICE, dtype=torch.float64) * 0.1)
    elif variant == "gmm":
        if g * g != N - 1:
            return None
        extra = dict(bias=GaussianMixture(torch.randn(H, 3, device=DEVICE, dtype=torch.float64),
                                          torch.randn(H, 3, device=DEVICE, dtype=torch.float64) * 0.3, g))
    leaves = {"qkv": qkv.to(dtype)}
    for name, value in extra.items():
        if isinstance(value, torch.Tensor):
            leaves[name] = value.float()
        elif isinstance(value, GaussianMixture):
            leaves["weight"], leaves["log_sigma"] = value.weight.float(), value.log_sigma.float()

    def call(values, backend):
        options = {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}
        options.update({k: values[k] for k in extra if k in values})
        if variant == "gmm":
            options["bias"] = GaussianMixture(values["weight"], values["log_sigma"], g)
        return functional.attention_qkvpacked(values["qkv"], H, **options, backend=backend)

    low = {k: v.detach().requires_grad_() for k, v in leaves.items()}
    high = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    out, ref = call(low, "triton"), call(high, "torch")
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad(out, list(low.values()), upstream.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, list(high.values()), upstream)
    errors = {"out": rel_err(out, ref)}
    errors.update({f"d{name}": rel_err(a, b) for name, a, b in zip(low, grads, ref_grads)})
    tol = TOL[dtype]
    limits = {k: (5 * tol if k in ("dscale", "dweight", "dlog_sigma") else tol) for k in errors}
    return errors, limits


def loss_case(B, C):
    z = torch.randn(B, C, device=DEVICE, dtype=torch.float64) * 3
    w = torch.randn(B, C, device=DEVICE, dtype=torch.float64) * 3
    y = torch.randint(0, C, (B,), device=DEVICE)
    y[torch.rand(B, device=DEVICE) < 0.25] = -100
    options = dict(label_smoothing=0.1, temperature=2.0, js_weight=0.3)
    weights = torch.randn(4, device=DEVICE, dtype=torch.float64)
    results = []
    for backend, dtype in (("triton", torch.bfloat16), ("torch", torch.float64)):
        zz, ww = z.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        out = functional.mgit_loss(zz, ww, y, **options, backend=backend)
        total = sum(c * o.double() for c, o in zip(weights, out))
        results.append((torch.stack([o.double() for o in out]), *torch.autograd.grad(total, [zz, ww])))
    # the bf16 inputs, exactly, in float64: the reference sees what the kernel saw
    z64, w64 = z.to(torch.bfloat16).double().requires_grad_(), w.to(torch.bfloat16).double().requires_grad_()
    out = functional.mgit_loss(z64, w64, y, **options, backend="torch")
    total = sum(c * o for c, o in zip(weights, out))
    ref = (torch.stack(list(out)).detach(), *torch.autograd.grad(total, [z64, w64]))
    errors = {k: rel_err(a, b) for k, a, b in zip(("outputs", "dz", "dw"), results[0], ref)}
    return errors, {"outputs": 1e-3, "dz": 2e-2, "dw": 2e-2}


def update_case(cfg, steps=3):
    """The parameter changes of three Triton steps against the torch backend in float64."""
    torch.manual_seed(0)
    primary, auxiliary = ViT(**cfg).to(DEVICE), ViT(**{**cfg, "depth": 1}).to(DEVICE)
    ref_p, ref_a = copy.deepcopy(primary).double(), copy.deepcopy(auxiliary).double()
    before = [p.detach().double().clone() for p in list(primary.parameters()) + list(auxiliary.parameters())]
    options = dict(lr=1e-3, max_grad_norm=1.0, pairing="head")
    ours = MultiGradientAdamW(primary, auxiliary, backend="triton", **options)
    ref = MultiGradientAdamW(ref_p, ref_a, backend="torch", **options)
    for step in range(steps):
        for m, r in ((primary, ref_p), (auxiliary, ref_a)):
            for p, q in zip(m.parameters(), r.parameters()):
                p.grad = torch.randn_like(p) * 1e-2
                q.grad = p.grad.double()
        ce = (torch.tensor(2.0 + step, device=DEVICE), torch.tensor(1.5, device=DEVICE))
        ours.step(*ce)
        ref.step(*(c.double() for c in ce))
    mine = torch.cat([(p.detach().double() - b).flatten() for p, b in
                      zip(list(primary.parameters()) + list(auxiliary.parameters()), before)])
    theirs = torch.cat([(p.detach() - b).flatten() for p, b in
                        zip(list(ref_p.parameters()) + list(ref_a.parameters()), before)])
    return {"parameter_change": rel_err(mine, theirs)}, {"parameter_change": 1e-4}


def cases(small: bool):
    if small:
        sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 2
        for dtype, D in ((torch.float32, 32), (torch.float16, 16), (torch.float16, 64), (torch.bfloat16, 128)):
            for variant in VARIANTS:
                yield f"attention {variant} B2 N17 H2 D{D} {dtype}", attention_case, (2, 17, 2, D, variant, dtype)
        yield "attention plain B·H>2·SMs N17 H2 D32 fp16", attention_case, (sms + 1, 17, 2, 32, "plain", torch.float16)
        for B, C in ((4, 10), (3, 3000)):
            yield f"loss B{B} C{C}", loss_case, (B, C)
        yield "update tiny pair", update_case, (dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=2,
                                                     num_classes=10),)
        return
    for name, B, N, dim, H in ATTENTION_SHAPES:
        for variant in VARIANTS:
            yield f"attention {name} {variant} bf16", attention_case, (B, N, H, dim // H, variant, torch.bfloat16)
    for B in LOSS_BATCHES:
        for C in LOSS_CLASSES:
            yield f"loss B{B} C{C}", loss_case, (B, C)
    for name, cfg in UPDATE_MODELS.items():
        yield f"update {name} pair", update_case, (cfg,)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the JSONL file to append to")
    parser.add_argument("--small", action="store_true", help="one small launch of every path (for the sanitizer)")
    args = parser.parse_args(argv)
    failed = 0
    with open(args.out, "a") as out:
        for name, fn, fn_args in cases(args.small):
            start = time.perf_counter()
            line = {"case": name}
            try:
                result = fn(*fn_args)
                if result is None:
                    continue
                errors, limits = result
                line.update(ok=all(errors[k] < limits[k] for k in errors), errors=errors, limits=limits)
            except Exception as error:  # recorded; the next case runs
                line.update(ok=False, error=f"{type(error).__name__}: {error}", trace=traceback.format_exc()[-1500:])
            line["seconds"] = round(time.perf_counter() - start, 3)
            failed += not line["ok"]
            out.write(json.dumps(line) + "\n")
            out.flush()
            print(("ok  " if line["ok"] else "FAIL") + f" {name} ({line['seconds']} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
