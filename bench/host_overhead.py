"""Host overhead of the Triton path, measured on the CPU with the kernel launches stubbed out.

Under ``TRITON_INTERPRET=1`` every ``kernel[grid](...)`` ends in Triton's
``GridExecutor.__call__``; this script replaces it with a no-op, so no kernel math runs (the
outputs are uninitialised memory) and what is timed is our Python around the launches:
argument checks, allocations, autograd / custom-op dispatch, the launchers' own work. Each case
is compared with ``torch.nn.functional.scaled_dot_product_attention`` forward+backward on a tiny
CPU tensor, timed in the same run, rounds interleaved (the order rotates) so the machine's noise
hits every case alike. Reported: the median per-call time over the rounds and op / SDPA.

    python bench/host_overhead.py [--repeats 60] [--inner 20] [--json PATH] [--check] [--stub POINT | --gpu]

With ``--gpu`` nothing is stubbed: the same cases run on tiny CUDA tensors with real launches
(kernels of a few µs, so the time per call is the host's), each round ending in one synchronise:
where the first GPU run's profile put 120-160 µs per Triton launch, this tells the launch's own
cost (``noop_launch``) from ours (``fwd_launch``) and from the whole op.

Cases (fp32, on the CPU or with ``--gpu`` the GPU, tensors requiring grad, ``.grad`` reset to
None before each call):

- ``attention``: ``functional.attention_qkvpacked(qkv, 2, backend="triton")``, qkv [2, 17, 96]
  (H = 2, D = 16), then ``out.backward(grad)`` with a preallocated grad;
- ``loss``: ``functional.mgit_loss(zP, zA, y, backend="triton")``, logits [8, 10], then
  ``.loss.backward()``;
- ``sdpa`` (the baseline): q, k, v [2, 2, 17, 16], then ``out.backward(grad)``;
- ``fwd_launch``: one launch of the attention forward kernel through our launcher
  (`kernels.attention.forward_into`, planned beforehand);
- ``noop_launch``: one launch of a Triton kernel that takes a pointer and does nothing.

Exit code 0 (a measurement); with ``--check``, 1 when a ratio misses its goal (GOALS).
The file is not named test_*.py, so ``pytest bench/`` does not collect it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

GOALS = {"attention": 3.0, "loss": 2.5}  # op fwd+bwd over tiny-SDPA fwd+bwd, at most


def stub_launches(point: str = "grid") -> None:
    """Turns every interpreted kernel launch into a no-op (TRITON_INTERPRET=1 must be set before
    the kernels are defined). `point` "grid": ``GridExecutor.__call__`` (the interpreter still
    builds a GridExecutor per launch, normalising every annotated kernel argument: interpreter
    work a GPU's cached JIT launch does not repeat); "launch": ``InterpretedFunction.run``, all of
    Triton's launch, so what remains is ours alone; "binder": ``InterpretedFunction.run`` replaced
    by the host work of a cached launch on a GPU up to the driver call (`gpu_launch_host_work`).
    Raises RuntimeError when Triton's interpreter has changed shape."""
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError as e:
        raise RuntimeError(f"host_overhead: Triton's interpreter does not import ({e})") from e
    executor = getattr(interpreter, "GridExecutor" if point == "grid" else "InterpretedFunction", None)
    method = "__call__" if point == "grid" else "run"
    if executor is None or not callable(getattr(executor, method, None)) or method not in vars(executor):
        import triton

        raise RuntimeError(
            f"host_overhead: triton.runtime.interpreter's {point!r} stub point is missing in Triton "
            f"{triton.__version__}; find where the interpreter runs a launch and stub that instead"
        )

    def no_launch(self, *args, **kwargs):
        return None

    setattr(executor, method, gpu_launch_host_work() if point == "binder" else no_launch)


def gpu_launch_host_work():
    """A stand-in for ``InterpretedFunction.run`` that does what ``JITFunction.run`` does on the
    host for an already compiled kernel on an sm_90a GPU before it calls the driver: bind the
    arguments (Triton's generated binder specialises every non-constexpr one), form the cache key,
    evaluate the grid. The driver call itself and the launch metadata are not included."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime import jit

        backend = make_backend(GPUTarget("cuda", 90, 32))
        create, cache_key = jit.create_function_from_signature, jit.compute_cache_key
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"host_overhead: Triton's JIT binder is not where this script looks ({e})") from e
    binders = {}

    def run(self, *args, grid, warmup=False, **kwargs):
        if self.fn not in binders:  # built once per kernel, as JITFunction.create_binder does
            fn = jit.JITFunction(self.fn)
            binders[self.fn] = (create(fn.signature, fn.params, backend), {})
        binder, key_cache = binders[self.fn]
        bound, specialization, options = binder(*args, **kwargs)
        cache_key(key_cache, specialization, options)
        if callable(grid):
            grid(bound)

    return run


def make_cases(device: str = "cpu"):
    """{name: zero-argument callable doing one forward+backward (or one launch)}."""
    import torch
    import torch.nn.functional as F
    import triton

    from mgit_fast import functional
    from mgit_fast.kernels import attention as kernels

    B, N, H, D = 2, 17, 2, 16
    qkv = torch.randn(B, N, 3 * H * D, device=device, requires_grad=True)
    grad_attention = torch.randn(B, N, H * D, device=device)
    q, k, v = (torch.randn(B, H, N, D, device=device, requires_grad=True) for _ in range(3))
    grad_sdpa = torch.randn(B, H, N, D, device=device)
    z, w = (torch.randn(8, 10, device=device, requires_grad=True) for _ in range(2))
    y = torch.randint(0, 10, (8,), device=device)
    out = torch.empty(B, N, H * D, device=device)
    lse = torch.empty(B, H, N, device=device)
    heads, outs = kernels.packed(qkv.detach(), H, 3), kernels.packed(out, H, 1)
    plan = kernels.plan(heads.shape, qkv.dtype, qkv.device)

    @triton.jit
    def noop(X):
        pass

    def fwd_launch():
        kernels.forward_into(heads, outs, lse, plan, None, D**-0.5, None, None, False)

    def noop_launch():
        noop[(1,)](lse)

    def attention():
        qkv.grad = None
        functional.attention_qkvpacked(qkv, H, backend="triton").backward(grad_attention)

    def loss():
        z.grad = w.grad = None
        functional.mgit_loss(z, w, y, backend="triton").loss.backward()

    def sdpa():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v).backward(grad_sdpa)

    return {"sdpa": sdpa, "attention": attention, "loss": loss, "fwd_launch": fwd_launch,
            "noop_launch": noop_launch}


def check_interpreted() -> None:
    """Fails clearly when the kernels were defined without the interpreter (so the stub would
    not catch their launches)."""
    from triton.runtime.interpreter import InterpretedFunction

    from mgit_fast.kernels import attention, mgit_loss

    for name, fn in (("mgit_loss", mgit_loss._mgit_loss_fwd_kernel), ("attention", attention.forward.attention_fwd_kernel)):
        if not isinstance(fn, InterpretedFunction):
            raise RuntimeError(f"host_overhead: the {name} kernels were not defined under TRITON_INTERPRET=1")


def measure(cases, repeats: int, inner: int, warmup: int = 5, sync=lambda: None):
    """{name: [per-call seconds of each round]}: `repeats` rounds of `inner` calls per case and one
    `sync()`, the cases' order rotating each round; garbage collection off while timing."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    names = list(cases)
    times = {name: [] for name in names}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                fn = cases[name]
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                sync()
                times[name].append((time.perf_counter() - start) / inner)
    finally:
        if enabled:
            gc.enable()
    return times


def summarize(times):
    """Medians (µs), quartiles, and the op / SDPA ratios with their goals."""
    median = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    quartiles = {}
    for name, t in times.items():
        qs = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        quartiles[name] = (qs[0] * 1e6, qs[2] * 1e6)
    ratios = {name: median[name] / median["sdpa"] for name in GOALS}
    return {
        "median_us": median,
        "quartiles_us": quartiles,
        "ratios": ratios,
        "goals": dict(GOALS),
        "met": {name: ratios[name] <= GOALS[name] for name in GOALS},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=60, help="timed rounds per case (default 60)")
    parser.add_argument("--inner", type=int, default=20, help="calls per round (default 20)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON (to a .jsonl: "
                        "append them as one line named host_overhead)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio misses its goal")
    parser.add_argument("--stub", choices=("grid", "launch", "binder"),
                        help="where launches are cut: grid (GridExecutor.__call__, default), launch "
                             "(InterpretedFunction.run: all of Triton's launch) or binder (Triton's "
                             "per-launch host work on a GPU up to the driver call, for sm_90a)")
    parser.add_argument("--gpu", action="store_true", help="real launches on the CUDA GPU, nothing stubbed")

    def refuse(message):  # one line, exit code 2, before any work
        print(f"host_overhead: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = refuse
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.inner < 1:
        parser.error("--repeats and --inner must be >= 1")
    if args.gpu and args.stub:
        parser.error("--gpu runs real launches: it takes no --stub")
    args.stub = None if args.gpu else (args.stub or "grid")
    if args.gpu:
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, real launches
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit defines the kernels
    import torch

    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA GPU here")
    torch.set_num_threads(1)
    if not args.gpu:
        try:
            stub_launches(args.stub)
            check_interpreted()
        except RuntimeError as e:  # the stub would not hold: no numbers rather than wrong ones
            print(e, file=sys.stderr)
            return 2
    device, sync = ("cuda", torch.cuda.synchronize) if args.gpu else ("cpu", lambda: None)
    result = summarize(measure(make_cases(device), args.repeats, args.inner, sync=sync))
    result.update(repeats=args.repeats, inner=args.inner, stub=args.stub, torch=torch.__version__,
                  device=torch.cuda.get_device_name() if args.gpu else "cpu")

    how = "real launches on " + result["device"] if args.gpu else f"kernel launches stubbed at {args.stub!r}"
    print(f"host time per call, median of {args.repeats} rounds x {args.inner} calls ({how})")
    print(f"{'case':<10} {'median µs':>10} {'p25':>8} {'p75':>8} {'/ sdpa':>7} {'goal':>6}")
    for name, med in result["median_us"].items():
        lo, hi = result["quartiles_us"][name]
        ratio = f"{med / result['median_us']['sdpa']:.2f}"
        goal = f"{GOALS[name]:.1f}" if name in GOALS else ""
        print(f"{name:<10} {med:>10.1f} {lo:>8.1f} {hi:>8.1f} {ratio:>7} {goal:>6}")
    for name, ratio in result["ratios"].items():
        verdict = "met" if result["met"][name] else "MISSED"
        print(f"{name}/sdpa ratio: {ratio:.2f} (goal <= {GOALS[name]:.1f}: {verdict})")
    if args.json and args.json.endswith(".jsonl"):
        with open(args.json, "a") as f:
            f.write(json.dumps({"name": "host_overhead", "host_overhead": result}) + "\n")
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.check and not all(result["met"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
