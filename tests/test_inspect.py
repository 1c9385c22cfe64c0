"""`mgit-fast inspect`: launch capture at shapes too large to run here, the compile gate's rules,
and the tool end to end (a real compile for sm_90a in a subprocess, without the interpreter).

The whole supported table is compiled for sm_90a and sm_80 by `.ci/run` (`mgit-fast inspect
--shapes gate --gate`), on the Triton CI installs and on Triton 3.6.
"""
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mgit_fast import inspect as ins
from mgit_fast.kernels.attention import common, op, planning

TARGET = ins.TARGETS["sm_90a"]


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("variant", ["plain", "lsa", "bias", "lsa_mask"])
def test_attention_grids_fit_cuda_limits_at_huge_batches(arch, packed, variant):
    """B·H = 120,000 (ViT-B at batch 10,000) and 600,000: the forward, dq and dk/dv kernels (and
    the shared-gradient pass for an [H, N, N] map) on every arch; every grid is within CUDA's
    limits and the program count covers every (block, head)."""
    for B, H in ((10_000, 12), (50_000, 12)):
        launches = ins.attention_launches("huge", B, 197, H, 64, torch.bfloat16, variant, packed=packed,
                                          target=ins.TARGETS[arch])
        shared = {"attention_bwd_shared_kernel"} if variant in ("bias", "lsa_mask") else set()
        assert sorted(launch.kernel for launch in launches) == sorted(
            {"attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel"} | shared)
        for launch in launches:
            assert ins.grid_problems(launch) == [], (launch.kernel, launch.grid)
            block = launch.constants["BLOCK_M"]  # every kernel's programs own BLOCK_M positions
            if launch.kernel == "attention_bwd_shared_kernel":  # (tile, group of batch rows, head)
                a = launch.args
                tiles = -(-197 // block) * -(-197 // launch.constants["BLOCK_N"])
                groups = -(-B // a["GROUP"])  # an [H, N, N] map: B contributors per head's slice
                assert a["B"] == B and a["GRAD_LAYOUT"] == 1 and a["GROUP"] * (groups - 1) < B
                assert launch.grid[0] == tiles * groups * H and launch.grid[1:] == (1, 1)
            else:
                assert launch.grid[0] == -(-197 // block) * B * H and launch.grid[1:] == (1, 1)


def test_capture_records_the_jit_specialisation():
    """Pointer alignment comes from each view's storage offset, as on the GPU; ints past 2³¹ are
    typed i64 by the binder; constexprs and launch options are kept, as planned (N = 65: the last
    key and the last query in 16-wide tail tiles)."""
    launches = ins.attention_launches("t", 4, 65, 3, 64, torch.bfloat16, "plain", packed=True, backward=False)
    (fwd,) = launches
    assert fwd.kernel == "attention_fwd_kernel"
    assert fwd.signature["Q"] == "*bf16" and fwd.signature["stride_n"] == "i32"
    kernel_plan = planning.plan((4, 3, 65, 64), torch.bfloat16).fwd
    config = kernel_plan.configs[0]
    assert fwd.constants == {"D": 64, "BLOCK_M": config.block_m, "BLOCK_N": kernel_plan.block_n, "TAIL_M": 16,
                             "TAIL_N": 16, "DIAGONAL_MASK": False, "PRECISION": "half", "SCALE": None,
                             "BIAS": None, "MASK": None, "BIAS_LAYOUT": -1, "MASK_LAYOUT": -1}
    assert (fwd.options["num_warps"], fwd.options["num_stages"]) == (config.num_warps, config.num_stages)
    names = list(fwd.args)
    aligned = {names[path[0]] for path, value in fwd.attrs.items() if ["tt.divisibility", 16] in value}
    assert {"Q", "K", "V", "O", "LSE"} <= aligned  # k, v views start H·D·2 = 384 bytes in
    # a v view starting 2 bytes off a 16-byte boundary loses its alignment attribute
    flat = torch.empty(1 + 2 * 17 * 96, device="meta", dtype=torch.bfloat16)
    with ins.capture(TARGET) as captured:
        op.run_forward(flat[1:].view(2, 17, 96), None, None, 2, None, 0.25, None, None, False)
    names = list(captured[0].args)
    aligned = {names[path[0]] for path, value in captured[0].attrs.items() if ["tt.divisibility", 16] in value}
    assert "Q" not in aligned and "O" in aligned


def test_large_dbias_and_packed_offsets_are_int64_safe():
    """The shapes the issue found wrapping: packed qkv at ViT-B/16 batch 4,732 and a per-batch
    bias gradient at B = 512, N = 577, H = 16. Their byte offsets pass 2³¹, so the kernels must
    form them from int64 head indices (`common.program`) and the binder must pass large strides
    as i64."""
    launches = ins.attention_launches("vit_b", 4732, 197, 12, 64, torch.bfloat16, "plain")
    assert all(not ins.grid_problems(launch) for launch in launches)
    assert 4732 * 197 * 3 * 768 > 2**31
    launches = ins.attention_launches("dbias", 512, 577, 16, 64, torch.bfloat16, "bias_batch")
    dq = next(launch for launch in launches if launch.kernel == "attention_bwd_dq_kernel")
    assert dq.args["DBIAS"] is not None and dq.args["DMASK"] is None  # a per-batch bias: stored by dq
    assert dq.args["BIAS_LAYOUT"] == 3 and 512 * 16 * 577 * 577 * 4 > 2**31  # a slice per (b, h)
    assert "to(tl.int64)" in inspect.getsource(common.program.fn)
    launches = ins.attention_launches("dmask", 512, 577, 16, 64, torch.bfloat16, "lsa_mask_batch")
    dq = next(launch for launch in launches if launch.kernel == "attention_bwd_dq_kernel")
    assert dq.args["DMASK"] is not None  # a per-batch mask: plain stores from the dq kernel
    assert dq.args["MASK_LAYOUT"] == 3
    assert "attention_bwd_shared_kernel" not in {launch.kernel for launch in launches}


def _configs(launches, kernel):
    return {(l.constants["BLOCK_M"], l.options["num_warps"], l.options["num_stages"])
            for l in launches if l.kernel == kernel}


def test_gate_shape_set_captures_every_candidate_config():
    """The gate compiles each config the autotuner may pick (`planning.every_config`); the bench
    set, like any launch off a GPU, the first only. N = 65 stays covered, its last key / query in
    a 16-wide tail tile."""
    gate = ins.shape_set("gate", TARGET)
    plans = {(64, False): planning.plan((8, 4, 197, 64), torch.bfloat16),
             (64, True): planning.plan((8, 4, 197, 64), torch.bfloat16, mask=True)}
    several = 0
    for (D, mask), p in plans.items():
        label = f"D={D} N=197 bf16 {'lsa_mask' if mask else 'plain'}"
        mine = [launch for launch in gate if launch.label == label]
        for kernel, kernel_plan in (("attention_fwd_kernel", p.fwd), ("attention_bwd_dq_kernel", p.dq),
                                    ("attention_bwd_dkdv_kernel", p.dkdv)):
            assert _configs(mine, kernel) == {(c.block_m, c.num_warps, c.num_stages) for c in kernel_plan.configs}
            several += len(kernel_plan.configs) > 1
    assert several, "no kernel with more than one candidate: the test would not tell"
    once = ins.attention_launches("b", 8, 197, 4, 64, torch.bfloat16, "plain")
    assert sorted(launch.kernel for launch in once) == sorted(
        ["attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel"])
    n65 = [launch for launch in gate if " N=65 " in launch.label and launch.kernel == "attention_fwd_kernel"]
    assert {launch.label.split()[0] for launch in n65} == {"D=16", "D=32", "D=64", "D=128"}
    assert any(launch.constants["TAIL_N"] == 16 for launch in n65)


def test_tf32_setting_reaches_the_plan():
    """`tf32` makes the launchers see PyTorch's choice without changing torch's own setting."""
    for allow, precision in ((True, "tf32"), (False, "ieee")):
        (fwd,) = ins.attention_launches("t", 2, 65, 2, 32, torch.float32, "plain", allow_tf32=allow, backward=False)
        assert fwd.constants["PRECISION"] == precision and fwd.label.split()[-2] == ("tf32" if allow else "fp32")


def test_loss_and_update_launches_at_scale():
    for B, C in ((4096, 21843), (1_000_000, 1000)):
        for launch in ins.loss_launches(B, C):
            assert not ins.grid_problems(launch)
    launches = ins.update_launches("vit_b", 768, 12, 12)
    assert [launch.kernel for launch in launches] == ["_sumsq_kernel", "_scalars_kernel", "_update_kernel"]
    assert all(not ins.grid_problems(launch) for launch in launches)


def test_grid_problems_flags_cuda_limits():
    launch = ins.Launch("k", "m", {}, {}, {}, {"num_warps": 4, "num_stages": 1}, (1, 65_536, 1), {})
    assert ins.grid_problems(launch) == ["grid y = 65,536 > 65,535"]
    launch.grid = (2**31, 1, 1)
    assert ins.grid_problems(launch) == ["grid x = 2,147,483,648 > 2,147,483,647"]


def _row(**overrides):
    base = dict(kernel="attention_fwd", label="D=64 N=197 bf16 plain", arch="sm_90a", status="ok", spill_bytes=0,
                local_ops=0, tensor_core={"HGMMA": 4, "HMMA": 0}, grid_problems=[], strong_atomics=[],
                num_warps=8, num_stages=3, constexprs={"BLOCK_M": 128, "BLOCK_N": 32, "TAIL_M": 128, "TAIL_N": 16})
    base.update(overrides)
    return base


@pytest.mark.parametrize("bad, rule", [
    (dict(spill_bytes=104, local_ops=26), "spills 104 B"),
    (dict(tensor_core={"HGMMA": 0, "HMMA": 0}), "no tensor-core instruction"),
    (dict(grid_problems=["grid y = 70,000 > 65,535"]), "grid y"),
    (dict(strong_atomics=["atom.global.gpu.acq_rel.add.f32"]), "stronger than relaxed"),
    (dict(status="failed: CompilationError: x"), "failed"),
])
def test_gate_rules(bad, rule):
    assert ins.gate_failures([_row()]) == []
    failures = ins.gate_failures([_row(**bad)])
    assert len(failures) == 1 and rule in failures[0]
    assert "BLOCK_M=128 BLOCK_N=32" in failures[0] and "warps=8 stages=3" in failures[0]  # which candidate


@pytest.mark.parametrize("kernel", ["attention_bwd_dq", "attention_bwd_dkdv", "attention_bwd_shared"])
def test_every_half_attention_kernel_needs_tensor_cores(kernel):
    """The rule keys on the kernel name; the useful fraction is information only."""
    row = _row(kernel=kernel, label="D=32 N=65 fp16 bias", tensor_core={"HGMMA": 0, "HMMA": 0}, useful_fraction=0.4)
    assert [f for f in ins.gate_failures([row]) if "no tensor-core instruction" in f]
    assert ins.gate_failures([_row(kernel=kernel, useful_fraction=0.1)]) == []


def test_fp32_attention_without_tensor_cores_is_not_a_gate_failure():
    assert ins.gate_failures([_row(label="D=64 N=197 fp32 plain", tensor_core={"HGMMA": 0, "HMMA": 0})]) == []


def test_occupancy_limits():
    blocks, limit = ins.occupancy({"num_warps": 4, "registers": 255, "shared": 40_000}, TARGET)
    assert (blocks, limit) == (2, "registers")
    blocks, limit = ins.occupancy({"num_warps": 4, "registers": 32, "shared": 100_000}, TARGET)
    assert (blocks, limit) == (2, "shared")
    blocks, limit = ins.occupancy({"num_warps": 4, "registers": 24, "shared": 0}, TARGET)
    assert (blocks, limit) == (16, "threads")


@pytest.mark.parametrize("setting, expected", [
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    ("torch.set_float32_matmul_precision('high')", True),
    ("pass", False),
])
def test_tf32_choice_is_read_through_either_api(setting, expected):
    """In a fresh process (the settings are global): the legacy getter raises on torch ≥ 2.9 once
    the new API was used; `tf32_allowed` must not."""
    code = f"import torch\n{setting}\nfrom mgit_fast.kernels.attention import tf32_allowed\nprint(tf32_allowed())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(expected)


PLANTED = '''
import triton
import triton.language as tl


@triton.jit
def strong_atomic(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(Y + offs % 4, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton.jit
def relaxed_atomic(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(Y + offs % 4, tl.load(X + offs, mask=offs < n), mask=offs < n, sem="relaxed")


@triton.jit
def spills(X, Y, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    x = tl.load(X + rows[:, None] * BLOCK + rows[None, :])  # BLOCK² fp32 live in one warp
    tl.store(Y + rows[:, None] * BLOCK + rows[None, :], tl.cumsum(x, 1) * tl.flip(x, 1))
'''

DRIVER = '''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import planted
import triton
from triton import knobs
from mgit_fast import inspect as ins
forced, compile = [], triton.compile
def spy(*args, **kwargs):  # whether each compile bypassed Triton's cache
    forced.append(knobs.compilation.always_compile)
    return compile(*args, **kwargs)
triton.compile = spy
rows = []
def atomics(fn):
    with ins.capture(ins.TARGETS["sm_90a"]) as launches:
        fn[(2,)](torch.empty(1024), torch.empty(4), 1024, BLOCK=512)
    return ins.analyse(launches, ins.TARGETS["sm_90a"], jobs=1)
rows += atomics(planted.strong_atomic) + atomics(planted.relaxed_atomic)
for _ in range(2):  # the second compile is a hit in Triton's cache
    with ins.capture(ins.TARGETS["sm_90a"]) as launches:
        planted.spills[(1,)](torch.empty(128 * 128), torch.empty(128 * 128), BLOCK=128, num_warps=1)
    rows += ins.analyse(launches, ins.TARGETS["sm_90a"], jobs=1)
rows += atomics(planted.relaxed_atomic)  # a hit too
print(json.dumps({"rows": rows, "forced": forced}))
'''


def test_compile_reads_the_cubin(tmp_path):
    """A real compile for sm_90a: 128-bit loads of aligned fp32, registers, occupancy, the
    memory order of atomics (the default acq_rel fails the gate, relaxed passes), and spill
    bytes, also when Triton's own cache holds the kernel (compiled past the cache only then)."""
    (tmp_path / "planted.py").write_text(PLANTED)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    strong, relaxed, spilled, spilled_again, relaxed_again = out["rows"]
    assert spilled["spill_bytes"] > 0 and spilled["local_ops"] > 0  # ptxas's log, read again on a cache hit
    assert all(spilled_again[k] == spilled[k] for k in ("spill_bytes", "local_ops", "registers"))
    assert all(relaxed_again[k] == relaxed[k] for k in ("spill_bytes", "local_ops", "registers", "atomics"))
    # only the cache hit that uses local memory compiles again, past the cache, for ptxas's log
    assert out["forced"] == [False, False, False, False, True, False], out["forced"]
    for r in (strong, relaxed):
        assert r["status"] == "ok" and r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
        assert 128 in r["load_bits"] and r["blocks_per_sm"] >= 1 and r["grid"] == [2, 1, 1]
    assert strong["strong_atomics"] and "acq_rel" in strong["strong_atomics"][0]
    assert not relaxed["strong_atomics"] and relaxed["atomics"]
    failures = ins.gate_failures([strong, relaxed])
    assert len(failures) == 1 and "strong_atomic" in failures[0]


def test_cli_bad_arguments_exit_2(capsys):
    from mgit_fast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--arch", "sm_70"])
    assert exc.value.code == 2
    assert main(["inspect", "--jobs", "-1"]) == 2
    assert "--jobs" in capsys.readouterr().err
    assert main(["inspect", "--json", "/proc/forbidden/x.json"]) == 2
