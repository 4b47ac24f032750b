"""Recorded autotuning choices (modeling_kimi_linear/triton_tuning.py): recorded after a run, given back to fresh
autotuners of the same GPU type and versions, and never anything but one of the kernel's own candidates.

Needs triton (the kernels are only defined, never launched: no GPU needed); skipped where it is not installed.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from modeling_kimi_linear import triton_tuning  # noqa: E402

CANDIDATES = [triton.Config({"BLOCK": 32}, num_warps=2), triton.Config({"BLOCK": 64}, num_warps=4),
              triton.Config({"BLOCK": 128}, num_warps=8, num_stages=2)]


def fake_fla_module(name: str = "fla.fake_ops") -> types.ModuleType:
    """A module defining one autotuned kernel (a fresh autotuner with an empty cache each call)."""

    @triton.autotune(configs=CANDIDATES, key=["N"])
    @triton.jit
    def scale_kernel(x, y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + offs, tl.load(x + offs, mask=offs < N) * 2, mask=offs < N)

    module = types.ModuleType(name)
    module.scale_kernel = scale_kernel
    return module


@pytest.fixture
def machine(monkeypatch):
    monkeypatch.setattr(triton_tuning, "machine_key", lambda: "Test GPU | fla 0.0 | triton 0.0")
    monkeypatch.delenv(triton_tuning.ENV_SWITCH, raising=False)
    yield
    sys.modules.pop("fla.fake_ops", None)


@pytest.mark.parametrize("suffix", [".json", ".py"])
def test_choices_recorded_and_given_back(machine, tmp_path, suffix):
    module = fake_fla_module()
    sys.modules[module.__name__] = module
    module.scale_kernel.cache[(4096, "torch.float32", "torch.float32")] = CANDIDATES[2]  # "autotuned"
    path = tmp_path / f"tuned{suffix}"
    assert triton_tuning.dump(path) == 1
    if suffix == ".json":
        stored = json.loads(path.read_text())
    else:  # the shipped form: a module whose RECORDS are the same data (imported here as Python would)
        namespace: dict = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 - the file this test just wrote
        stored = namespace["RECORDS"]
        assert stored == triton_tuning.read(path)
    assert list(stored) == ["Test GPU | fla 0.0 | triton 0.0"]
    module.scale_kernel.cache.clear()  # a later process that tuned another key only: the file keeps the first
    module.scale_kernel.cache[(8192, "torch.float32", "torch.float32")] = CANDIDATES[0]
    assert triton_tuning.dump(path) == 1
    assert len(triton_tuning.read(path)["Test GPU | fla 0.0 | triton 0.0"]["fla.fake_ops:scale_kernel"]) == 2

    fresh = fake_fla_module()  # a new process: the same kernel, nothing tuned
    sys.modules[fresh.__name__] = fresh
    assert triton_tuning.apply(path) == 2
    assert fresh.scale_kernel.cache == {(4096, "torch.float32", "torch.float32"): fresh.scale_kernel.configs[2],
                                        (8192, "torch.float32", "torch.float32"): fresh.scale_kernel.configs[0]}


def test_other_machines_unknown_configs_and_the_switch_fill_nothing(machine, tmp_path, monkeypatch):
    module = fake_fla_module()
    sys.modules[module.__name__] = module
    path = tmp_path / "tuned.json"
    record = {"kwargs": {"BLOCK": 256}, "num_warps": 4, "num_stages": 3, "num_ctas": 1, "maxnreg": None}
    good = {"kwargs": {"BLOCK": 64}, "num_warps": 4, "num_stages": 3, "num_ctas": 1, "maxnreg": None}
    path.write_text(json.dumps({
        "Test GPU | fla 0.0 | triton 0.0": {"fla.fake_ops:scale_kernel": [[[1], record], [[2], good]]},
        "Other GPU | fla 0.0 | triton 0.0": {"fla.fake_ops:scale_kernel": [[[3], good]]},
    }))
    assert triton_tuning.apply(path) == 1  # the 256 block is no candidate of this kernel; the other GPU's is not ours
    assert set(module.scale_kernel.cache) == {(2,)}
    module.scale_kernel.cache.clear()
    monkeypatch.setenv(triton_tuning.ENV_SWITCH, "0")
    assert triton_tuning.apply(path) == 0 and not module.scale_kernel.cache
