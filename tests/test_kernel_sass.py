"""bench/kernel_sass.py compiles our decode kernels for sm_90 without a GPU and reads their SASS: the claims the
kernel modules make from it hold (the router's 1-warp selection crosses no warps; int8 expert weights are widened
without conversion-unit instructions in the loop; the multi-linear launch's one-token form uses no tensor-core
instruction and no conversion unit). Needs triton (not its interpreter); skipped where absent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "kernel_sass.py"


def sass_lines(kernels: str) -> list[str]:
    """``bench/kernel_sass.py --kernels ...`` in a fresh process without ``TRITON_INTERPRET`` (kernels imported under
    the interpreter by other tests of this process could not be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(SCRIPT.parent.parent)
    done = subprocess.run([sys.executable, str(SCRIPT), "--kernels", kernels], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def counts(line: str) -> dict[str, int]:
    return {op: int(n) for op, n in re.findall(r"\b([A-Z0-9]+) (\d+)(?=,|$)", line.split("instructions:")[1])}


def test_router_and_expert_kernels_compile_and_read_back():
    lines = sass_lines("router,experts")
    assert len(lines) == 3 + 8 and all("registers" in line and "0 bytes spill stores" in line for line in lines)
    router = {int(re.match(r"router, (\d)", line).group(1)): counts(line) for line in lines[:3]}
    assert router[1].get("BAR", 0) < 10 < router[4]["BAR"]  # shuffles only, against shared-memory round trips
    for line in lines[3:]:
        found = counts(line)
        if "GEMV" in line:  # no tensor cores, no conversion unit in the loop (one I2F outside it, as in the dot form)
            assert not found.get("HMMA") and found.get("I2F", 0) <= 1, line
            continue
        assert found["HMMA"] > 0 and found.get("LDGSTS", 0) > 0, line  # tensor cores, asynchronous copies
        if "int8" in line:
            assert found.get("I2F", 0) <= 1 and found.get("PRMT", 0) > 0, line  # widened by byte permutes


def test_one_token_multi_linear_form_reads_weights_without_tensor_cores_or_conversions():
    lines = sass_lines("mlinear")
    assert len(lines) == 8 and all("0 bytes spill stores" in line for line in lines)
    for line in lines:
        found = counts(line)
        if "GEMV" in line:
            assert not found.get("HMMA") and found.get("I2F", 0) <= 1, line
        else:
            assert found["HMMA"] > 0, line
