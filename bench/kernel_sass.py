"""What our Triton decode kernels compile to on a Hopper GPU, read without one: resources and instruction mix.

Each kernel is compiled ahead of time for ``sm_<arch>`` at the release's widths (hidden 2304, 256 experts, expert
width 1024, bf16 activations), assembled by the ``ptxas`` shipped in Triton's wheel and disassembled by its
``cuobjdump``. Printed per variant: registers per thread, spills, shared memory, and counts of the SASS instructions
that answer the usual questions (METHOD.md of the device tool: "read what costs no device time"): matrix
instructions (``HMMA`` is ``mma.sync``, ``HGMMA`` is ``wgmma``), asynchronous copies into shared memory
(``LDGSTS``), plain global loads, barriers across warps (``BAR``), warp shuffles, conversions through the
conversion pipe (``I2F`` / ``F2F`` / ``F2FP``) against byte permutes (``PRMT``) and packed half adds (``HADD2``),
local-memory traffic (``LDL`` / ``STL``: an array the compiler could not keep in registers).

Kernels (``--kernels``):

* ``router``: ``moe_decode_triton._router_logits`` with its selection, one token, at 1, 2 and 4 warps
  (``ROUTER_DECODE_WARPS``).
* ``experts``: ``_gate_up`` and ``_down`` on bf16 weights and on int8 weights (torchao's per-row layout), batch-1
  tiles (``GATE_UP_TILE`` / ``DOWN_TILE``), the padded ``tl.dot`` and the one-token element-wise form (``GEMV``).
* ``mlinear``: the multi-linear launch at batch 1 (KDA's six projections from x; a single o_proj split over K),
  int8 and bf16 weights, the padded ``tl.dot`` against the one-token element-wise form (``GEMV``).

Needs triton only (no GPU, no CUDA driver)::

    python bench/kernel_sass.py --kernels router,experts,mlinear
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SMEM_LIMIT = 227 * 1024  # per block on Hopper
WATCHED = ("HGMMA", "HMMA", "LDGSTS", "LDG", "LDSM", "LDS", "STS", "BAR", "SHFL", "I2F", "F2F", "F2FP", "PRMT", "HADD2",
           "LDL", "STL")


def tool(name: str) -> Path:
    """A binary (``ptxas``, ``cuobjdump``) of the CUDA tools in Triton's wheel."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def compile_kernel(fn: Any, types: dict[str, str], constexprs: dict[str, Any], *, num_warps: int, num_stages: int,
                   arch: int = 90, ints: dict[str, int] | None = None, launch_pdl: bool = False) -> Any:
    """``triton.compile`` of the JIT function ``fn`` for ``sm_<arch>`` without a GPU. ``types``: argument types by
    name (``"*bf16"``, ``"fp32"``, ...; unnamed arguments are ``i32``); ``constexprs``: compile-time values by name.
    ``ints``: the values integer arguments take in the launch being modelled, specialised as the launcher does
    (a 1 becomes a constant, a multiple of 16 is marked so; arguments in the kernel's ``do_not_specialize`` are
    left alone). Pointer arguments are marked 16-byte aligned (ours are)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    fixed = {fn.arg_names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    aligned_ints = set()
    for name, value in (ints or {}).items():
        if name in fixed:
            continue
        if value == 1:
            constexprs[name] = 1
        elif value % 16 == 0:
            aligned_ints.add(name)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    aligned = [i for i, name in enumerate(signature) if signature[name].startswith("*") or name in aligned_ints]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if launch_pdl:
        options["launch_pdl"] = True
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_report(ptx: str, arch: int) -> str:
    """``ptxas -v``'s registers / spills lines for ``ptx`` assembled for ``sm_<arch>a``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(tool("ptxas")), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True)
    return "; ".join(line.split(":", 2)[-1].strip() for line in res.stderr.splitlines()
                     if "registers" in line or "spill" in line)


def sass_opcodes(cubin: bytes) -> collections.Counter:
    """Opcode counts (without modifiers) of the SASS in ``cubin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool("cuobjdump")), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    found: collections.Counter = collections.Counter()
    for line in text.splitlines():
        match = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)", line)
        if match:
            found[match.group(1)] += 1
    return found


def describe(name: str, kernel: Any, arch: int) -> str:
    """One line: resources and the watched instruction counts of a compiled kernel."""
    counts = sass_opcodes(kernel.asm["cubin"])
    shared = kernel.metadata.shared
    watched = ", ".join(f"{op} {counts[op]}" for op in WATCHED if counts[op])
    return (f"{name}: {ptxas_report(kernel.asm['ptx'], arch)}; shared {shared / 1024:.1f} KB"
            f"{' (over the limit)' if shared > SMEM_LIMIT else ''}; {sum(counts.values())} instructions: {watched}")


def router_variants(arch: int) -> list[tuple[str, Any]]:
    """The router kernel with its selection (one token, the release's routing) at 1, 2 and 4 warps."""
    from modeling_kimi_linear import moe_decode_triton as mdt

    types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", "bias_ptr": "*fp32", "ids_ptr": "*i64",
             "weights_ptr": "*fp32", "cnt_ptr": "*i32", "scaling": "fp32"}
    constexprs = dict(D=2304, BLOCK_M=1, BLOCK_E=mdt.ROUTER_DECODE_BLOCK_E, BLOCK_D=mdt.ROUTER_DECODE_BLOCK_D,
                      LINES=64, SELECT=True, EP=256, TOP_K=8, KP=8, NUM_GROUPS=1, NGP=1, TOPK_GROUP=1,
                      GROUP_SIZE=256, SOFTMAX=False, INCLUDE_BIAS=True, RENORMALIZE=True, PDL=False)
    ints = {"N": 1, "E": 256}
    return [(f"router, {warps} warp{'s' if warps > 1 else ''}",
             compile_kernel(mdt._router_logits, types, constexprs, num_warps=warps, num_stages=3, arch=arch,
                            ints=ints))
            for warps in (1, 2, 4)]


def expert_variants(arch: int) -> list[tuple[str, Any]]:
    """``_gate_up`` and ``_down`` at batch 1 (one token's experts, ``DIRECT``) on bf16 and on int8 weights, the
    padded ``tl.dot`` and the one-token element-wise form (``GEMV``)."""
    from modeling_kimi_linear import moe_decode_triton as mdt

    out = []
    hidden, inter = 2304, 1024
    for kernel, tile, act in ((mdt._gate_up, mdt.GATE_UP_TILE, "x_ptr"), (mdt._down, mdt.DOWN_TILE, "h_ptr")):
        for quant in (False, True):
            for gemv in (False, True):
                weight = "*i8" if quant else "*bf16"
                types = {name: "*bf16" for name in kernel.arg_names if name.endswith("_ptr")}
                types.update({name: weight for name in kernel.arg_names if name in ("w_ptr", "sw_gate_ptr",
                                                                                   "sw_up_ptr", "sw_ptr")})
                types.update({name: "*fp32" for name in kernel.arg_names if "scale" in name or name in (
                    "ys_ptr", "weights_ptr")})
                types.update({name: "*i8" for name in kernel.arg_names if "zero" in name})
                types.update({"groups_ptr": "*i32", "ids_ptr": "*i64", "order_ptr": "*i32", act: "*bf16"})
                constexprs = dict(D=hidden, I=inter, QUANT=quant, HAS_ZERO=False, SHARED=False, DIRECT=True,
                                  BLOCK_M=1 if gemv else mdt.BLOCK_M, BLOCK_N=tile["BLOCK_N"],
                                  BLOCK_K=tile["BLOCK_K"], PRECISION="tf32", GEMV=gemv,
                                  LOOP_STAGES=mdt.GEMV_STAGES if gemv else tile["num_stages"], PDL=False)
                rows = 2 * inter if kernel is mdt._gate_up else hidden
                width = hidden if kernel is mdt._gate_up else inter
                ints = {"G": 8, "TOP_K": 8, "C": 8, "N": 1, "stride_x": hidden, "stride_we": rows * width,
                        "stride_wn": width, "stride_wk": 1}  # batch 1: 8 groups of one copy, contiguous weights
                compiled = compile_kernel(kernel, types, constexprs, num_warps=tile["num_warps"],
                                          num_stages=tile["num_stages"], arch=arch, ints=ints)
                out.append((f"{kernel.fn.__name__} {'int8' if quant else 'bf16'} weights, "
                            f"{'GEMV' if gemv else 'padded dot'} {tile}", compiled))
    return out


def multi_linear_variants(arch: int) -> list[tuple[str, Any]]:
    """The multi-linear launch at batch 1 with int8 and bf16 weights, padded ``tl.dot`` against the one-token
    element-wise form (``GEMV``): KDA's six projections from x (K 2304, the default tile) and a single o_proj
    (K 4096, 16-row tiles, K split in 4)."""
    from modeling_kimi_linear import multi_linear_triton as m

    out = []
    for quant in (True, False):
        for what, k, given in (("six from x", 2304, {}), ("o_proj", 4096, {"BLOCK_N": 16, **m.SPLIT_TILE,
                                                                         "SPLIT": m.SPLIT_PARTS})):
            tile = {**(m.INT8_TILE if quant else m.TILE), "SPLIT": 1, **given}
            for gemv in (False, True):
                weight = "*i8" if quant else "*bf16"
                types = {"ws": "*fp32", "cnt": "*i32"}
                for name in m._multi_linear.arg_names:
                    if name[0] in "xwysz" and name[1:].isdigit():
                        types[name] = {"x": "*bf16", "y": "*bf16", "w": weight, "s": "*fp32" if quant else "*bf16",
                                       "z": "*fp32" if quant else "*bf16"}[name[0]]
                constexprs = dict(QUANT=quant, HAS_ZERO=False, K_ALL=k, SX_ALL=k, BLOCK_M=1 if gemv else m.BLOCK_M,
                                  BLOCK_N=tile["BLOCK_N"], BLOCK_K=tile["BLOCK_K"], SPLIT=tile["SPLIT"],
                                  PRECISION="tf32", GEMV=gemv, LOOP_STAGES=1 if gemv else tile["num_stages"],
                                  PREFETCH=m.PREFETCH_LINES, PDL=False)
                compiled = compile_kernel(m._multi_linear, types, constexprs, num_warps=tile["num_warps"],
                                          num_stages=tile["num_stages"], arch=arch, ints={"M": 1})
                out.append((f"multi_linear {what}, {'int8' if quant else 'bf16'} weights, "
                            f"{'GEMV' if gemv else 'padded dot'} (N {tile['BLOCK_N']}, K {tile['BLOCK_K']}, "
                            f"{tile['num_warps']} warps, split {tile['SPLIT']})", compiled))
    return out


VARIANTS = {"router": router_variants, "experts": expert_variants, "mlinear": multi_linear_variants}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default=",".join(VARIANTS), help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    args = parser.parse_args(argv)
    wanted = [k for k in args.kernels.split(",") if k]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown kernels {unknown}; choose from {sorted(VARIANTS)}")
    for group in wanted:
        for name, kernel in VARIANTS[group](args.arch):
            print(describe(name, kernel, args.arch), flush=True)


if __name__ == "__main__":
    main()
