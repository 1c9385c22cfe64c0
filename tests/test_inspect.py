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
from mgit_fast.kernels import attention as attention_kernel

TARGET = ins.TARGETS["sm_90a"]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("variant", ["plain", "lsa", "bias", "lsa_mask"])
def test_attention_grids_fit_cuda_limits_at_huge_batches(packed, variant):
    """B·H = 120,000 (ViT-B at batch 10,000) and 600,000: every launch's grid is within CUDA's
    limits, and the program count covers every (query block, head)."""
    for B, H in ((10_000, 12), (50_000, 12)):
        launches = ins.attention_launches("huge", B, 197, H, 64, torch.bfloat16, variant, packed=packed)
        shared = {"_attention_bwd_shared_kernel"} if variant in ("bias", "lsa_mask") else set()  # an [H, N, N] map
        # the fused backward (one program per SM) for every variant here on sm_90a; with a mask at
        # D = 64, sm_80 keeps the two kernels
        assert {launch.kernel for launch in launches} == {"_attention_fwd_kernel", "_attention_bwd_fused_kernel"} | shared
        if variant == "lsa_mask":
            on_sm80 = ins.attention_launches("huge", B, 197, H, 64, torch.bfloat16, variant, packed=packed,
                                             target=ins.TARGETS["sm_80"])
            assert {launch.kernel for launch in on_sm80} == {"_attention_fwd_kernel", "_attention_bwd_dq_kernel",
                                                             "_attention_bwd_dkdv_kernel"} | shared
            launches += on_sm80
        for launch in launches:
            assert ins.grid_problems(launch) == [], (launch.kernel, launch.grid)
            if launch.kernel == "_attention_bwd_fused_kernel":
                assert launch.grid == (TARGET.sms, 1, 1) and launch.args["BH"] == B * H
                continue
            block = launch.constants["BLOCK_M"]  # every kernel's programs own BLOCK_M positions
            if launch.kernel == "_attention_bwd_shared_kernel":  # (tile, group of batch rows, head)
                a = launch.args
                tiles = -(-197 // block) * -(-197 // launch.constants["BLOCK_N"])
                assert a["R"] == B and a["GROUP"] * a["GROUPS"] >= B > a["GROUP"] * (a["GROUPS"] - 1)
                assert launch.grid[0] == tiles * a["GROUPS"] * H and launch.grid[1:] == (1, 1)
            else:
                assert launch.grid[0] == -(-197 // block) * B * H and launch.grid[1:] == (1, 1)


def test_capture_records_the_jit_specialisation():
    """Pointer alignment comes from each view's storage offset, as on the GPU; ints past 2³¹ are
    typed i64 by the binder; constexprs and launch options are kept."""
    launches = ins.attention_launches("t", 4, 65, 3, 64, torch.bfloat16, "plain", packed=True, backward=False)
    (fwd,) = launches
    assert fwd.signature["Q"] == "*bf16" and fwd.signature["stride_qn"] == "i32"
    assert fwd.constants == {"D": 64, "BLOCK_M": 64, "BLOCK_N": 32, "TAIL_M": 16, "TAIL_N": 1, "SPLIT": True,
                             "HAS_SCALE_TENSOR": False, "HAS_BIAS": False,
                             "DIAGONAL_MASK": False, "PRECISION": "half", "SCALE": None, "BIAS": None,
                             "HAS_MASK": False, "MASK": None}
    names = list(fwd.args)
    aligned = {names[path[0]] for path, value in fwd.attrs.items() if ["tt.divisibility", 16] in value}
    assert {"Q", "K", "V", "O", "LSE"} <= aligned  # k, v views start H·D·2 = 384 bytes in
    # a v view starting 2 bytes off a 16-byte boundary loses its alignment attribute
    flat = torch.empty(1 + 2 * 17 * 96, device="meta", dtype=torch.bfloat16)
    q, k, v = attention_kernel._heads(flat[1:].view(2, 17, 96), 2, 3)
    out = torch.empty(2, 2, 17, 16, device="meta", dtype=torch.bfloat16)
    with ins.capture(TARGET) as captured:
        attention_kernel.forward_into(q, k, v, out, None, 0.25, None, False)
    names = list(captured[0].args)
    aligned = {names[path[0]] for path, value in captured[0].attrs.items() if ["tt.divisibility", 16] in value}
    assert "Q" not in aligned and "O" in aligned
    assert fwd.options["num_warps"] == 4 and fwd.options["num_stages"] == 3  # the split geometry at D = 64


def test_large_dbias_and_packed_offsets_are_int64_safe():
    """The shapes the issue found wrapping: packed qkv at ViT-B/16 batch 4,732 and a per-batch
    bias gradient at B = 512, N = 577, H = 16. Their byte offsets pass 2³¹, so the kernels must
    form them from int64 head indices (`_program`) and the binder must pass large strides as i64."""
    launches = ins.attention_launches("vit_b", 4732, 197, 12, 64, torch.bfloat16, "plain")
    assert all(not ins.grid_problems(launch) for launch in launches)
    assert 4732 * 197 * 3 * 768 > 2**31
    launches = ins.attention_launches("dbias", 512, 577, 16, 64, torch.bfloat16, "bias_batch")
    dq = next(launch for launch in launches if launch.kernel == "_attention_bwd_dq_kernel")
    assert dq.args["stride_gb"] == 16 * 577 * 577 and 512 * dq.args["stride_gb"] * 4 > 2**31
    assert "to(tl.int64)" in inspect.getsource(attention_kernel._program.fn)
    launches = ins.attention_launches("dmask", 512, 577, 16, 64, torch.bfloat16, "lsa_mask_batch")
    dq = next(launch for launch in launches if launch.kernel == "_attention_bwd_dq_kernel")
    assert dq.constants["NEED_DMASK"]  # a per-batch mask: plain stores from the dq kernel
    assert dq.args["stride_dmb"] == 16 * 577 * 577 and dq.args["stride_mb"] == 16 * 577 * 577


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("N", [65, 197, 257, 577])
def test_vit_lengths_meet_the_useful_tile_goals(arch, N):
    """Every attention launch with tile matmuls at the ViT lengths (bf16, D = 32 and 64, every
    variant; the fused backward and the two-kernel one) executes tile work that is ≥ 75 % useful
    at N = 65 and ≥ 85 % at N ≥ 197, as the model counts it (rank-1 tails on CUDA cores apart)."""
    goal = 0.75 if N == 65 else 0.85
    kernels = set()
    for D in (32, 64):
        for fused in (False, True):
            for variant in ("plain", "lsa", "bias", "bias_batch", "lsa_mask", "lsa_mask_batch", "gmm"):
                for launch in ins.attention_launches("vit", 4, N, 2, D, torch.bfloat16, variant,
                                                     target=ins.TARGETS[arch], fused=fused):
                    if "executed_flops" not in launch.work:
                        continue
                    kernels.add(launch.kernel)
                    useful = launch.work["useful_tile_flops"] / launch.work["executed_flops"]
                    assert useful >= goal, (launch.kernel, D, variant, useful)
    assert kernels == {"_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel",
                       "_attention_bwd_fused_kernel", "_attention_bwd_shared_kernel"}


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
                useful_fraction=0.9)
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


def test_fp32_attention_without_tensor_cores_is_not_a_gate_failure():
    assert ins.gate_failures([_row(label="D=64 N=197 fp32 plain", tensor_core={"HGMMA": 0, "HMMA": 0})]) == []


def test_a_launch_without_tile_matmuls_needs_no_tensor_cores():
    """The GMM's dense-bias kernel runs beside bf16 attention but multiplies no tiles."""
    row = _row(kernel="attention_gmm_bias", label="D=64 N=197 bf16 gmm", tensor_core={"HGMMA": 0, "HMMA": 0})
    del row["useful_fraction"]
    assert ins.gate_failures([row]) == []


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
'''

DRIVER = '''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import planted
from mgit_fast import inspect as ins
rows = []
for fn in (planted.strong_atomic, planted.relaxed_atomic):
    with ins.capture(ins.TARGETS["sm_90a"]) as launches:
        fn[(2,)](torch.empty(1024), torch.empty(4), 1024, BLOCK=512)
    rows += ins.analyse(launches, ins.TARGETS["sm_90a"], jobs=1)
print(json.dumps(rows))
'''


def test_compile_reads_the_cubin(tmp_path):
    """A real compile for sm_90a: 128-bit loads of aligned fp32, registers, occupancy, and the
    memory order of atomics (the default acq_rel fails the gate, relaxed passes)."""
    (tmp_path / "planted.py").write_text(PLANTED)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    strong, relaxed = json.loads(result.stdout.strip().splitlines()[-1])
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
