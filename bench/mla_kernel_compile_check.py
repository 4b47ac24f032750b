"""Compile the MLA flash-decoding kernel for a Hopper GPU without one: what each launch configuration costs.

For every configuration in ``mla_decode_triton.CONFIGS`` (bf16) and ``FP32_CONFIG`` (fp32) at the release's shape
(32 heads, 512 + 64 latent), Triton compiles the split kernel ahead of time for ``sm_<arch>`` and ``ptxas`` (the one
shipped in Triton's wheel) assembles it. Printed per configuration: shared memory (a Hopper block may use at most
227 KB), registers per thread and spills, the tensor-core instructions used (``wgmma`` or ``mma.sync``), the
asynchronous copies the pipeliner made, and the ``async_wait`` counts in the loop (how many copy groups stay in
flight while a tile is computed: 0 means no overlap of loads and arithmetic). Needs triton; no GPU, no CUDA driver.

    python bench/mla_kernel_compile_check.py
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_sass import SMEM_LIMIT, ptxas_report  # noqa: E402


def split_kernel_signature(dtype: str) -> dict[str, str]:
    """Argument types of ``_mla_decode_split_kernel`` as the launcher sees them for a 1M-row buffer."""
    from modeling_kimi_linear import mla_decode_triton as mdt

    types = {"q_ptr": f"*{dtype}", "qr_ptr": f"*{dtype}", "kv_ptr": f"*{dtype}", "mask_ptr": "*u8",
             "limit_ptr": "*i64", "part_ptr": "*fp32", "lse_ptr": "*fp32", "qk_scale": "fp32",
             "stride_kb": "i64"}  # a batch stride of a long buffer passes 2**31
    constexprs = ("DV", "DR", "BLOCK_H", "BLOCK_DV", "BLOCK_DR", "BLOCK_S", "HAS_MASK", "HAS_LIMIT", "KV_MAJOR",
                  "PRECISION", "PDL")
    return {name: "constexpr" if name in constexprs else types.get(name, "i32")
            for name in mdt._mla_decode_split_kernel.arg_names}


def compile_config(config, dtype: str, arch: int):  # noqa: ANN001, ANN201
    from kernel_sass import compile_kernel

    from modeling_kimi_linear import mla_decode_triton as mdt

    sig = split_kernel_signature(dtype)
    constexprs = {"DV": 512, "DR": 64, "BLOCK_H": 32, "BLOCK_DV": 512, "BLOCK_DR": 64, "BLOCK_S": config.block_s,
                  "HAS_MASK": True, "HAS_LIMIT": True, "KV_MAJOR": config.kv_major,
                  "PRECISION": "ieee" if dtype == "fp32" else "tf32", "PDL": True}
    # the strides the host passes are multiples of 16, as the launcher's specialisation would note
    strides = ("stride_qb", "stride_qh", "stride_rb", "stride_rh", "stride_kb", "stride_ks", "stride_pb", "stride_ps",
               "stride_ph", "stride_lb", "stride_ls")
    types = {name: kind for name, kind in sig.items() if kind != "constexpr"}
    return compile_kernel(mdt._mla_decode_split_kernel, types, constexprs, num_warps=config.num_warps,
                          num_stages=config.num_stages, arch=arch, ints={name: 16 for name in strides},
                          launch_pdl=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    args = parser.parse_args(argv)
    from modeling_kimi_linear import mla_decode_triton as mdt

    for config, dtype in [(c, "bf16") for c in mdt.CONFIGS] + [(mdt.FP32_CONFIG, "fp32")]:
        try:
            kernel = compile_config(config, dtype, args.arch)
        except Exception as err:  # report and go on: one configuration may not compile for this target
            print(f"{config} {dtype}: compile failed: {type(err).__name__}: {err}"[:400])
            continue
        ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
        shared = kernel.metadata.shared
        waits = re.findall(r"async_wait .*?num = (\d+)", ttgir)
        print(f"{config} {dtype}: shared {shared / 1024:.0f} KB{' (over the limit)' if shared > SMEM_LIMIT else ''}; "
              f"wgmma {ptx.count('wgmma.mma_async')}, mma.sync {ptx.count('mma.sync')}, cp.async "
              f"{ptx.count('cp.async.cg') + ptx.count('cp.async.ca')}; async_wait counts {waits}; "
              f"{ptxas_report(ptx, args.arch)}", flush=True)


if __name__ == "__main__":
    main()
