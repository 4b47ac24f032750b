"""examples/multi_gpu/fsdp_check.py: FSDP2 over two CPU processes (gloo, through torchrun) trains exactly like one
process, and the comparison it decides by flags a difference."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "multi_gpu" / "fsdp_check.py"


def fsdp_check_module():
    return load_script(SCRIPT, "fsdp_check_example")


def test_two_cpu_processes_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
         "--cpu", "--steps", "3"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "FSDP2 over 2 processes (cpu, gloo)" in proc.stdout
    steps = re.findall(r"^\s*(\d+) \| ([\d.]+) \| ([\d.e+-]+) \| ([\d.e+-]+) \| (\S+)$", proc.stdout, re.M)
    assert [int(s[0]) for s in steps] == [1, 2, 3], proc.stdout
    for _, loss, loss_diff, param_diff, _ in steps:
        assert math.isfinite(float(loss)) and float(loss_diff) <= 1e-5 and float(param_diff) <= 1e-5
    assert proc.stdout.rstrip().endswith("PASS")


def test_the_comparison_finds_the_largest_difference_and_nan():
    module = fsdp_check_module()
    a, b = torch.zeros(3, 4), torch.zeros(3, 4)
    b[1, 2] = 3e-5
    pairs = [("x", torch.ones(2), torch.ones(2)), ("y", a, b), ("z", a[:1], a[:1] + 1e-6)]
    assert module.largest_difference(pairs) == (torch.tensor(3e-5).item(), "y")
    assert not module.within([1e-6, 3e-5], 1e-5) and module.within([1e-6, 0.0], 1e-5)
    nan = torch.tensor([float("nan")])
    worst, where = module.largest_difference([("x", a, b), ("n", nan, torch.zeros(1)), ("z", a, b + 1)])
    assert math.isnan(worst) and where == "n" and not module.within([worst], 1e-5)
