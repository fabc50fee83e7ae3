"""The Triton kernels compiled for a real GPU target without a GPU: each kernel at its default config
for sm_90a (H100), through benchmarks/kernel_resources.py --quick in a subprocess (the compiler needs
the real JIT functions, which TRITON_INTERPRET replaces; Triton's cache goes to a temporary directory).

Fails on a compile error, shared memory over the target's limit, a register spill in the scaling and
log-domain passes, or a resident pass that loads an element of the matrix more than once per
iteration (the one-read promise, read off the PTX) or without 16-byte vector loads at K = 1000 / 3000.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import kernel_resources as kr  # noqa: E402

ITERATION_KERNELS = ["scaling resident", "logdomain resident", "scaling stream", "logdomain stream"]
ALL_KERNELS = ITERATION_KERNELS + ["prepare", "labels", "implicit"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel-resources") / "kr.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_resources.py"), "--quick",
                           "--targets", "sm_90a", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.load(open(out))["results"]
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    return by_kernel


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_kernel_compiles_for_sm90a(compiled, kernel):
    rows = compiled.get(kernel)
    assert rows, f"{kernel}: nothing compiled"
    for r in rows:
        where = f"{kernel} {r['variant']} K={r['K']} {r['config']} {r['num_warps']} warps"
        assert r["ok"], f"{where}: {r['error']}"
        assert r["shared"] <= r["smem_limit"], f"{where}: {r['shared']} B of shared memory > {r['smem_limit']}"
        assert r["registers"] and r["registers"] <= 255, where


@pytest.mark.parametrize("kernel", ITERATION_KERNELS)
def test_iteration_kernels_do_not_spill(compiled, kernel):
    for r in compiled[kernel]:
        assert not r["spills"], (f"{kernel} {r['variant']} K={r['K']} {r['config']} {r['num_warps']} warps: "
                                 f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads")


@pytest.mark.parametrize("kernel", ["scaling resident", "logdomain resident"])
def test_resident_passes_read_the_matrix_once(compiled, kernel):
    """K = 1000 and 3000: every element of the matrix loaded from global memory once per iteration, in
    16-byte vector loads (the rows start on 16-byte boundaries); the streaming kernels read it twice."""
    rows = [r for r in compiled[kernel] if r["K"] in (1000, 3000)]
    assert {r["K"] for r in rows} == {1000, 3000}
    for r in rows:
        loads = r["matrix_loads"]
        assert loads["per_iteration"] == 1.0, f"{kernel} K={r['K']} {r['variant']}: {loads}"
        assert all(set(lp["widths"]) == {"16"} for lp in loads["loops"]), f"{kernel} K={r['K']}: {loads}"
    for r in compiled[kernel.replace("resident", "stream")]:
        assert r["matrix_loads"]["per_iteration"] == 2.0


PTX = """
.visible .entry k(.param .u64 k_param_0, .param .u64 k_param_1, .param .u32 k_param_2)
{
	ld.param.u64 	%rd1, [k_param_0];
	ld.param.u64 	%rd2, [k_param_1];
	ld.param.u32 	%r1, [k_param_2];
$L__BB0_2:                              // =>This Loop Header: Depth=1
                                        //     Child Loop BB0_3 Depth 2
	add.s64 	%rd3, %rd1, %rd9;
	@%p1 ld.global.b32 { %r4 }, [ %rd2 + 0 ];
$L__BB0_3:                              //   Parent Loop BB0_2 Depth=1
                                        // =>  This Inner Loop Header: Depth=2
	mul.wide.s32 	%rd5, %r1, 4;
	add.s64 	%rd6, %rd3, %rd5;
	@%p2 ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd6 + 0 ];
	ld.global.nc.b64 	%rd7, [ %rd6 + 16 ];
	cp.async.cg.shared.global [ %r9 + 0 ], [ %rd2 + 0 ], 0x10, %r10;
	@%p3 bra 	$L__BB0_3;
// %bb.4:                               //   in Loop: Header=BB0_2 Depth=1
	@%p4 bra 	$L__BB0_2;
	ret;
}
"""


def test_ptx_loop_analysis():
    """Loads are counted per loop, not its nested loops; each attributed to the pointer it derives from
    (an integer argument is no root); vector widths and cp.async sizes in bytes."""
    loops = {lp["header"]: lp for lp in kr.analyse_ptx(PTX, ["X", "Y", "n"], ["X", "Y"])}
    assert loops["BB0_2"]["depth"] == 1 and not loops["BB0_2"]["innermost"]
    assert loops["BB0_2"]["by_arg"] == {"Y": {"n": 1, "bytes": 4, "widths": {4: 1}}}
    inner = loops["BB0_3"]
    assert inner["depth"] == 2 and inner["innermost"] and inner["parent"] == "BB0_2"
    assert inner["by_arg"] == {"X": {"n": 2, "bytes": 24, "widths": {16: 1, 8: 1}},
                               "Y": {"n": 1, "bytes": 16, "widths": {16: 1}}}
