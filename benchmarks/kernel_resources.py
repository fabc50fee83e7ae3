"""Compile every Triton kernel ahead of time for sm_80 (A100) and sm_90a (H100), without a GPU,
and record what each compiled config costs: registers per thread, spill stores/loads, stack,
shared memory, and the global loads each loop issues per thread and trip (ld.global and
cp.async from the PTX, attributed to the pointer argument each address derives from). For the
kernels that stream a matrix, ``matrix_loads`` compares the matrix bytes a trip loads with the
tile it covers: ``per_iteration`` = how many times one pass loads each element from global memory.

Covers every autotune config the GPU path can pick (``GPU_CONFIGS`` of each kernel module, the
resident passes' configs as pruned for each K), float32 and float64 (and float16/bfloat16 features
for the implicit pass), every constexpr flag the launchers pass, for K = 1000, 3000 and the longest
resident row (30000 for the streaming passes), and those + 1 (odd: scalar loads) and + 2 (float32: 8-byte
loads).
Pointers are compiled as the JIT specialises them for torch allocations (16-byte aligned); K is
not a multiple of 16, so it gets no divisibility hint (the kernels' VEC constexpr gives it).

    python benchmarks/kernel_resources.py            # everything: results/kernel-resources.json and .md
    python benchmarks/kernel_resources.py --quick --targets sm_90a --out /tmp/kr.json   # tests/test_kernel_compile.py

Needs no GPU. Runs without TRITON_INTERPRET (the interpreter replaces the JIT functions; the script
starts itself again without it), Triton's compile cache in a temporary directory unless
TRITON_CACHE_DIR is set.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import triton
from selflabel.kernels import implicit, labels, logdomain, prepare, scaling
from selflabel.kernels._common import vector_width
from selflabel.kernels.scaling import RESIDENT_BYTES
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "kernel-resources.json")

# per target: compute capability and the most shared memory one block may use (the opt-in maximum
# per block: 163 KiB on A100, 227 KiB on H100; what Triton's launcher checks against)
TARGETS = {"sm_80": (80, 166_912), "sm_90a": (90, 232_448)}
ELEM = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}


@dataclass
class Variant:
    """One compiled specialisation of a kernel: the dtype, the K it stands for (K sets VEC, and
    K_PAD for the resident kernels) and the constexpr flags."""

    dtype: str  # of the streamed matrix (or of the features)
    k: int
    flags: dict = field(default_factory=dict)
    quick: bool = False  # in the CI set (--quick: these variants at the default config)

    @property
    def name(self) -> str:
        return self.dtype + "".join(f" {f}" if on is True else f" {f}={on}" if isinstance(on, str) else ""
                                    for f, on in self.flags.items())


@dataclass
class Kernel:
    name: str
    fn: object  # the autotuned kernel
    signature: object  # dtype -> {arg: type} without constexprs
    variants: list[Variant]
    matrix_arg: str  # the argument holding the (H, N, K) matrix (or the features)
    configs: object  # variant -> [triton.Config]: what the GPU autotuner may pick (first = default)
    constexprs: object = None  # (variant, config) -> extra constexprs (VEC, K_PAD, heuristics)
    tile: object = None  # (variant, config) -> bytes of the matrix one inner-loop trip covers
    check_spills: bool = False  # the CI test fails on a spill at the default config
    div16: tuple = ()  # integer arguments compiled as multiples of 16 (as the JIT specialises them)


def _jit(fn):
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap autotune / heuristics
        fn = fn.fn
    return fn


def _p(t: str) -> str:
    return "*" + t


def _vec(v: Variant) -> dict:
    return {"VEC": vector_width(v.k, ELEM[v.dtype])}


def _block_tile(v: Variant, c) -> int:
    return c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] * ELEM[v.dtype]


def _resident(mod, v: Variant, c) -> dict:
    k_pad, vec = triton.next_power_of_2(v.k), _vec(v)["VEC"]
    return {"VEC": vec, "K_PAD": k_pad,
            "BLOCK_N": mod.resident_block_n(c.kwargs["THREAD_BYTES"], c.num_warps, k_pad, ELEM[v.dtype], vec)}


def _resident_tile(mod, v: Variant, c) -> int:
    return _resident(mod, v, c)["BLOCK_N"] * triton.next_power_of_2(v.k) * ELEM[v.dtype]


# The K each variant is compiled for: 1000 and 3000 (SeLa's K; multiples of 4: float32 rows start on
# 16 bytes), the longest resident row, 30000 for the streaming kernels (rows longer than RESIDENT_BYTES),
# and the same + 1 (odd: scalar loads) and, in float32, + 2 (8-byte loads).
def _ks(kind: str, dtype: str) -> list[int]:
    base = {"resident": [1000, 3000, RESIDENT_BYTES // ELEM[dtype], 3001],
            "stream": [30000, 30001]}.get(kind, [3000, 3001])
    return base + ([base[-1] + 1] if dtype == "fp32" else [])  # + float32 in 8-byte loads (K = 2 mod 4)


def kernels() -> list[Kernel]:
    out = []
    sig_scaling = lambda d: {"M": _p(d), "A": _p(d), "U": _p(d), "V": _p(d), "W_PART": _p(d),  # noqa: E731
                             "CHANGE_PART": "*fp64", "NPROG": "i32", "N": "i32", "K": "i32",
                             "OMEGA": "fp64"}
    sig_log = lambda d: {"L": _p(d), "LOG_A": _p(d), "F": _p(d), "G": _p(d), "W_PART": _p(d),  # noqa: E731
                         "MX_PART": _p(d), "CHANGE_PART": "*fp64", "NPROG": "i32", "N": "i32", "K": "i32",
                         "OMEGA": "fp64"}
    for name, mod, fn, sig, arg in [("scaling", scaling, scaling._scaling_resident_kernel, sig_scaling, "M"),
                                    ("logdomain", logdomain, logdomain._log_resident_kernel, sig_log, "L")]:
        out.append(Kernel(
            name + " resident", fn, sig, [Variant(d, k) for d in ("fp32", "fp64") for k in _ks("resident", d)],
            arg, lambda v: scaling.resident_configs(triton.next_power_of_2(v.k), ELEM[v.dtype], _vec(v)["VEC"]),
            lambda v, c, mod=mod: _resident(mod, v, c), lambda v, c, mod=mod: _resident_tile(mod, v, c), True))
    for name, mod, fn, sig, arg in [("scaling", scaling, scaling._scaling_stream_kernel, sig_scaling, "M"),
                                    ("logdomain", logdomain, logdomain._log_stream_kernel, sig_log, "L")]:
        out.append(Kernel(
            name + " stream", fn, sig, [Variant(d, k) for d in ("fp32", "fp64") for k in _ks("stream", d)],
            arg, lambda v, mod=mod: mod.stream_configs(ELEM[v.dtype], _vec(v)["VEC"]), lambda v, c: _vec(v),
            _block_tile, True))
    out.append(Kernel(
        "prepare", prepare._prepare_kernel,
        lambda d: {"S": _p(d), "OUT": _p(d), "ROWMAX": _p(d), "ROWSUM": "*fp64", "ROWMIN": "*fp64",
                   "COLMAX_PART": _p(d), "NPROG": "i32", "N": "i32", "K": "i32", "lamb": "fp64"},
        [Variant(d, k, {"PROBS": p, "EXPONENTIATE": e}) for d in ("fp32", "fp64") for k in _ks("", d)
         for p in (False, True) for e in (False, True)],
        "S", lambda v: prepare.configs_for(ELEM[v.dtype], _vec(v)["VEC"]), lambda v, c: _vec(v), _block_tile))
    out.append(Kernel(
        "labels", labels._labels_kernel,
        lambda d: {"X": _p(d), "COL": _p(d), "OUT": "*i64", "N": "i32", "K": "i32", "ROW_OFFSET": "i64",
                   "TIE_SLACK": "fp64"},
        [Variant(d, k, {"LINEAR": lin}) for d in ("fp32", "fp64") for k in _ks("", d) for lin in (False, True)],
        "X", lambda v: labels.configs_for(ELEM[v.dtype], _vec(v)["VEC"]), lambda v, c: _vec(v), _block_tile))
    # implicit: features in fp16/bf16/fp32 (tl.dot, fp32 potentials; fp32 at each input precision
    # implicit.dot_precision chooses) or fp64 (exact, fp64 potentials), D = 128 (a multiple of 16, as the
    # JIT specialises it)
    out.append(Kernel(
        "implicit", implicit._implicit_log_pass_kernel, _implicit_sig,
        [Variant(x, 3000, {"HAS_BIAS": b, "EXACT": x == "fp64", **p}) for x in ("fp16", "bf16", "fp32", "fp64")
         for b in (True, False)
         for p in ([{"PRECISION": q} for q in ("ieee", "tf32x3", "tf32")] if x == "fp32" else [{}])],
        "X", lambda v: implicit.configs_for(v.flags["EXACT"]),
        lambda v, c: {} if "PRECISION" in v.flags else {"PRECISION": "tf32"}, None, div16=("D",)))
    ci_flags = {"PROBS": True, "EXPONENTIATE": True, "LINEAR": False, "HAS_BIAS": True}
    for kern in out:  # the CI set: SeLa's K in both dtypes (K = 1000 for the one-read check, odd K for the passes)
        for v in kern.variants:
            narrow = kern.check_spills and v.k in (3001, 30001)  # the iteration passes' scalar-load configs too
            v.quick = (v.dtype in ("fp32", "fp64") and (v.k in (3000, 30000) or (v.k, v.dtype) == (1000, "fp32")
                                                        or narrow)
                       and all(v.flags.get(f, on) == on for f, on in ci_flags.items()))
    return out


def _implicit_sig(x: str) -> dict:
    d = "fp64" if x == "fp64" else "fp32"
    return {"X": _p(x), "W": _p(x), "BIAS": _p(d), "ROWMAX": _p(d), "LOG_A": _p(d), "F": _p(d), "G": _p(d),
            "W_PART": _p(d), "MX_PART": _p(d), "CHANGE_PART": "*fp64", "NPROG": "i32", "N": "i32", "K": "i32",
            "D": "i32", "lamb": "fp64", "OMEGA": "fp64"}


# ---------------------------------------------------------------- PTX: loops and global loads

_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BB = re.compile(r"^\s*//\s*%bb\.\d+:")
_HEADER = re.compile(r"=>\s*This (?:Inner )?Loop Header: Depth=(\d+)")
_IN_LOOP = re.compile(r"in Loop: Header=(BB\d+_\d+) Depth=(\d+)")
_REG = re.compile(r"%[a-z]+\d+")


def _ld_bytes(op: str) -> int:
    """Bytes per thread of an ld instruction such as ld.global.v4.b32 or ld.global.nc.b64."""
    vec = re.search(r"\.v(\d)\b", op)
    bits = re.findall(r"\.[bsuf](\d+)\b", op)
    return (int(vec.group(1)) if vec else 1) * (int(bits[-1]) // 8 if bits else 4)


def analyse_ptx(ptx: str, arg_names: list[str], pointers: list[str]) -> list[dict]:
    """Every loop of the PTX (LLVM's loop comments) with the global loads issued directly in it
    (not in a nested loop), per thread and trip: ld.global and cp.async (global -> shared)
    instructions, grouped by the pointer argument the address derives from (taint through
    register arithmetic; ``arg_names``: the kernel's runtime arguments in PTX parameter order)."""
    lines = ptx.splitlines()
    # 1. registers derived from each pointer parameter
    roots: dict[str, set] = {}
    insts = []
    for ln in lines:
        s = ln.strip()
        if not s or s.startswith("//") or s.endswith(":") or s.startswith("."):
            continue
        s = re.sub(r"^@!?%p\d+\s+", "", s)
        op, _, rest = s.partition(" ")
        regs = _REG.findall(rest)
        m = re.search(r"\[(\w+)_param_(\d+)\]", rest)
        if op.startswith("ld.param") and m and regs:
            if arg_names[int(m.group(2))] in pointers:
                roots.setdefault(regs[0], set()).add(arg_names[int(m.group(2))])
            continue
        if op.startswith(("ld.", "st.", "cp.", "atom.", "red.", "bra", "bar", "ret", "shfl", "setp")) or not regs:
            continue
        insts.append((regs[0], regs[1:]))
    changed = True
    while changed:  # fixed point (loop-carried pointer phis are movs)
        changed = False
        for dst, srcs in insts:
            got = set().union(*(roots.get(r, set()) for r in srcs)) if srcs else set()
            if got - roots.get(dst, set()):
                roots.setdefault(dst, set()).update(got)
                changed = True
    # 2. basic blocks -> their innermost loop
    block_of, block_loop, depth, parent = {}, {}, {}, {}
    cur = None
    for i, ln in enumerate(lines):
        m = _LABEL.match(ln)
        if m or _BB.match(ln):
            cur = m.group(1)[1:].replace("L__", "") if m else f"anon{i}"
            block_loop[cur] = None
        if cur is None:
            continue
        h = _HEADER.search(ln)
        if h:
            block_loop[cur] = cur
            depth[cur] = int(h.group(1))
        il = _IN_LOOP.search(ln)
        if il and block_loop.get(cur) is None:
            block_loop[cur] = il.group(1)
        pl = re.search(r"Parent Loop (BB\d+_\d+) Depth=(\d+)", ln)
        if pl:
            parent[cur] = pl.group(1)  # the last one printed is the immediate parent
        block_of[i] = cur
    loops = {h: {"header": h, "depth": depth[h], "parent": parent.get(h), "innermost": True, "ld_global": 0,
                 "bytes_per_thread": 0, "by_arg": {}} for h in depth}
    for h in loops:
        if parent.get(h) in loops:
            loops[parent[h]]["innermost"] = False
    for i, ln in enumerate(lines):
        s = re.sub(r"^@!?%p\d+\s+", "", ln.strip())
        if not (s.startswith("ld.global") or (s.startswith("cp.async") and ".global" in s.split(" ")[0])):
            continue
        loop = block_loop.get(block_of.get(i))
        if loop not in loops:
            continue
        op, _, rest = s.partition(" ")
        addrs = re.findall(r"\[\s*(%\w+)", rest)
        if op.startswith("cp.async"):  # cp.async.*.shared.global [smem], [gmem], bytes
            addr = addrs[1] if len(addrs) > 1 else None
            size = re.search(r"\],\s*(0x[0-9a-fA-F]+|\d+)", rest.split("]", 1)[1])
            b = int(size.group(1), 0) if size else 0
        else:
            addr = addrs[0] if addrs else None
            b = _ld_bytes(op)
        src = "+".join(sorted(roots.get(addr, {"?"}))) if addr else "?"
        e = loops[loop]
        e["ld_global"] += 1
        e["bytes_per_thread"] += b
        a = e["by_arg"].setdefault(src, {"n": 0, "bytes": 0, "widths": {}})
        a["n"] += 1
        a["bytes"] += b
        a["widths"][b] = a["widths"].get(b, 0) + 1
    return sorted(loops.values(), key=lambda e: int(e["header"].split("_")[-1]))


# ---------------------------------------------------------------- compile one config

def _ptxas_numbers(log: str) -> dict:
    def num(pat):
        m = re.search(pat, log)
        return int(m.group(1)) if m else None
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def _run_ptxas(ptx: str, target: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", f"--gpu-name={target}", src, "-o",
                              os.path.join(d, "k.o")], capture_output=True, text=True, check=True)
        return out.stderr + out.stdout


def compile_one(kernel: Kernel, variant: Variant, cfg, target: str) -> dict:
    cap, smem_limit = TARGETS[target]
    fn = _jit(kernel.fn)
    consts = {**variant.flags, **kernel.constexprs(variant, cfg), **cfg.kwargs}
    sig = {**kernel.signature(variant.dtype), **{k: "constexpr" for k in consts}}
    sig = {a: sig[a] for a in fn.arg_names}  # in the kernel's order (a missing argument raises here)
    ptrs = [a for a, t in sig.items() if t.startswith("*")]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]  # pointers 16-byte aligned, as torch's
             for a in [*ptrs, *kernel.div16]}
    row = {"kernel": kernel.name, "variant": variant.name, "dtype": variant.dtype, "K": variant.k, "target": target,
           "config": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
           "constexprs": {k: v for k, v in consts.items() if k not in cfg.kwargs and k not in variant.flags}}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton runs `ptxas -v`; keep its report
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cap, 32),
                               options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as e:  # a compile error is a result
        msg = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        row.update(ok=False, error=" | ".join(msg[-4:])[:500], seconds=round(time.perf_counter() - t0, 2))
        return row
    finally:
        triton.knobs.nvidia.dump_ptxas_log = False
    ptxas_log = log.getvalue()
    if "Used" not in ptxas_log:  # a compile cache hit runs no ptxas: run it on the PTX
        ptxas_log = _run_ptxas(k.asm["ptx"], target)
    row.update(ok=True, seconds=round(time.perf_counter() - t0, 2), shared=k.metadata.shared,
               smem_limit=smem_limit, **_ptxas_numbers(ptxas_log))
    row["over_smem"] = k.metadata.shared > smem_limit
    row["spills"] = bool(row["spill_stores"] or row["spill_loads"])
    row["loops"] = analyse_ptx(k.asm["ptx"], [a for a, t in sig.items() if t != "constexpr"], ptrs)
    row["matrix_loads"] = _matrix_loads(row, kernel, variant, cfg)
    return row


def _matrix_loads(row: dict, kernel: Kernel, variant: Variant, cfg) -> dict:
    """Per innermost loop that reads the matrix: its bytes loaded per trip by all threads of the
    program against the tile one trip covers (1.0: each element loaded once by that loop), and
    the load widths. ``per_iteration``: global loads of each matrix element per pass."""
    if kernel.tile is None:
        return None
    threads = 32 * cfg.num_warps
    tile = kernel.tile(variant, cfg)
    out = []
    for lp in row["loops"]:
        a = lp["by_arg"].get(kernel.matrix_arg)
        if a:
            out.append({"header": lp["header"], "bytes_per_trip": a["bytes"] * threads, "tile_bytes": tile,
                        "loads_per_element": round(a["bytes"] * threads / tile, 3), "widths": a["widths"]})
    return {"loops": out, "per_iteration": round(sum(x["loads_per_element"] for x in out), 3)}


# ---------------------------------------------------------------- report

def _cfg(r: dict) -> str:
    c = ", ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in r["config"].items())
    extra = {k: v for k, v in r.get("constexprs", {}).items() if k in ("BLOCK_N",)}
    return c + "".join(f" (N={v})" for v in extra.values()) + f", {r['num_warps']} warps"


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r["ok"]:
        return "**compile error**"
    smem = f"{r['shared'] / 1024:g} KiB" if r["shared"] >= 1024 else f"{r['shared']} B"
    s = f"{r['registers']} / {smem}"
    if r["spills"]:
        s += f" / **spill {r['spill_stores']}+{r['spill_loads']} B**"
    if r["over_smem"]:
        s += " / **over smem**"
    return s


def _loads(r: dict | None) -> str:
    """Global loads per thread and trip of each loop that has any (sm_90a), and the matrix reads."""
    if not r or not r["ok"]:
        return "-"
    parts = [f"{lp['ld_global']}" for lp in r["loops"] if lp["ld_global"]]
    s = " + ".join(parts) or "0"
    ml = r.get("matrix_loads")
    if ml and ml["loops"]:
        widths = sorted({int(w) for lp in ml["loops"] for w in lp["widths"]})
        s += f"; matrix {ml['per_iteration']:g}x per pass, {'/'.join(map(str, widths))} B loads"
    return s


def table(rows: list[dict], default_only: bool = False) -> str:
    """Markdown: one line per kernel, variant, K and config (or only the default configs), sm_80 and
    sm_90a side by side: registers per thread / shared memory (spills and overflows in bold), then
    the global loads each loop issues per thread and trip on sm_90a."""
    by = {}
    for r in rows:
        if default_only and not r["default"]:
            continue
        key = (r["kernel"], r["variant"], r["K"], json.dumps(r["config"]), r["num_warps"])
        by.setdefault(key, {})[r["target"]] = r
    out = ["| kernel | variant | K | config | sm_80 regs / smem | sm_90a regs / smem | global loads per trip "
           "(sm_90a) |", "|---|---|---|---|---|---|---|"]
    for (kern, var, k, _, _), t in by.items():
        any_r = next(iter(t.values()))
        out.append(f"| {kern} | {var} | {k} | {_cfg(any_r)} | {_cell(t.get('sm_80'))} | {_cell(t.get('sm_90a'))} | "
                   f"{_loads(t.get('sm_90a') or any_r)} |")
    return "\n".join(out) + "\n"


def summary_table(rows: list[dict]) -> str:
    """Markdown for the README: per kernel and dtype, the default config at K = 3000 (30000 for the
    streaming passes) on both targets, the matrix reads per pass, and how many of the configs the
    GPU path can pick (every K and flag, both targets) compiled, spilled or overflowed."""
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"]), []).append(r)
    shown = {"prepare": {"PROBS", "EXPONENTIATE"}, "implicit": {"HAS_BIAS"}}  # flags of the row shown
    out = ["| kernel | dtype | default config | sm_80 regs / smem | sm_90a regs / smem | global loads per trip "
           "(sm_90a) | compiles: spill / over smem / error |", "|---|---|---|---|---|---|---|"]
    for (kern, dtype), rs in groups.items():
        d = {r["target"]: r for r in rs if r["default"] and r["K"] in (3000, 30000)
             and set(r["variant"].split()[1:]) - {"EXACT", "PRECISION=ieee"} == shown.get(kern, set())}
        if not d:
            continue
        any_r = next(iter(d.values()))
        counts = (f"{len(rs)}: {sum(r.get('spills', False) for r in rs)} / {sum(r.get('over_smem', False) for r in rs)}"
                  f" / {sum(not r['ok'] for r in rs)}")
        out.append(f"| {kern} | {dtype} | {_cfg(any_r)} | {_cell(d.get('sm_80'))} | {_cell(d.get('sm_90a'))} | "
                   f"{_loads(d.get('sm_90a') or any_r)} | {counts} |")
    return "\n".join(out) + "\n"


def write_tables(report: dict, path: str) -> None:
    with open(path, "w") as f:
        f.write(f"From `python benchmarks/kernel_resources.py` (triton {report['triton']}, {report['ptxas']}); "
                "registers per thread / shared memory per block.\n\nDefault configs:\n\n"
                + summary_table(report["results"]) + "\nEvery config:\n\n" + table(report["results"]))


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the kernels must be JIT functions: start again without
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        args = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *args], env)
    with tempfile.TemporaryDirectory(prefix="kernel-resources-") as cache:
        os.environ.setdefault("TRITON_CACHE_DIR", cache)  # nothing cached outside a temporary directory
        return _main(argv)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--kernels", nargs="+", default=None, help="names (prepare scaling logdomain labels implicit)")
    ap.add_argument("--default-only", action="store_true", help="only each kernel's default (first) config")
    ap.add_argument("--quick", action="store_true", help="the CI set: a few variants per kernel, default config")
    ap.add_argument("--out", default=DEFAULT_JSON, help="JSON report (the markdown tables go next to it)")
    ap.add_argument("--tables-only", action="store_true", help="rewrite the markdown from the JSON at --out")
    args = ap.parse_args(argv)
    if args.tables_only:
        write_tables(json.load(open(args.out)), os.path.splitext(args.out)[0] + ".md")
        return 0
    rows = []
    t0 = time.perf_counter()
    for kern in kernels():
        if args.kernels and kern.name not in args.kernels and kern.name.split()[0] not in args.kernels:
            continue
        for var in kern.variants:
            if args.quick and not var.quick:
                continue
            cfgs = kern.configs(var)
            for cfg in cfgs[:1] if args.default_only or args.quick else cfgs:
                for tgt in args.targets:
                    r = compile_one(kern, var, cfg, tgt)
                    r["default"] = cfg is cfgs[0]
                    r["check_spills"] = kern.check_spills
                    rows.append(r)
                    status = ("ERROR " + r["error"][:120]) if not r["ok"] else (
                        f"regs {r['registers']:3d} spill {r['spill_stores']}/{r['spill_loads']} "
                        f"smem {r['shared']:6d} loads {_loads(r)}")
                    print(f"{kern.name:18s} {var.name:22s} K={var.k:<5d} {tgt:6s} {json.dumps(cfg.kwargs):40s} "
                          f"w{cfg.num_warps} {r['seconds']:5.1f}s {status}", flush=True)
    report = {"date": dt.date.today().isoformat(), "triton": triton.__version__,
              "ptxas": os.path.basename(triton.knobs.nvidia.ptxas.path) + " " + _ptxas_version(),
              "targets": {t: {"capability": TARGETS[t][0], "smem_limit": TARGETS[t][1]} for t in args.targets},
              "compile_seconds": round(time.perf_counter() - t0, 1), "results": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:  # one result per line
        head = json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1)
        f.write(head[:-2] + ',\n "results": [\n' + ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
                + "\n ]\n}\n")
    write_tables(report, os.path.splitext(args.out)[0] + ".md")
    bad = [r for r in rows if not r["ok"] or r["over_smem"]]
    print(f"{len(rows)} compiles in {report['compile_seconds']} s; {len(bad)} failed or over shared memory; "
          f"{sum(r.get('spills', False) for r in rows)} spill; wrote {args.out}")
    return 0


def _ptxas_version() -> str:
    try:
        return triton.knobs.nvidia.ptxas.version.strip().splitlines()[-1]
    except Exception:  # pragma: no cover - informational only
        return "?"


if __name__ == "__main__":
    sys.exit(main())
