"""The dispatch seam: CPU tensors never reach fla, whatever is installed; 'fla' on CPU fails clearly."""

from __future__ import annotations

import pytest
import torch

from modeling_kimi_linear import KimiLinearForCausalLM, kda_fla, kernels
from modeling_kimi_linear.presets import load_preset


def _exploding_ops():
    def boom(*args, **kwargs):
        raise RuntimeError("0 active drivers ([]). There should only be one.")  # what fla+triton do on a CPU box

    return boom, boom


@pytest.fixture
def fla_importable_but_broken(monkeypatch):
    """Simulate fla + triton installed on a machine without a GPU: the ops import, and crash if called."""
    monkeypatch.setattr(kernels, "fla_kda_ops", _exploding_ops)
    monkeypatch.setattr(kda_fla, "fla_kda_ops", _exploding_ops)


def test_auto_backend_keeps_cpu_tensors_on_torch(fla_importable_but_broken):
    assert kernels.resolve_kda_backend("auto", torch.device("cpu")) == "torch"
    model = KimiLinearForCausalLM(load_preset("tiny")).eval()
    assert model.config.kda_backend == "auto"
    with torch.no_grad():
        out = model.generate(torch.randint(3, 512, (1, 70)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 73)


def test_fla_backend_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        kernels.resolve_kda_backend("fla", torch.device("cpu"))
    model = KimiLinearForCausalLM(load_preset("tiny", kda_backend="fla")).eval()
    with pytest.raises(RuntimeError, match="kda_backend='fla' needs CUDA"):
        model(torch.randint(3, 512, (1, 8)))


def test_installed_fla_without_triton_imports_cleanly():
    # fla-core is a test dependency, installed without triton: our probe must answer None, not raise
    pytest.importorskip("fla")
    kda_fla.fla_kda_ops.cache_clear()
    try:
        import triton  # noqa: F401  (availability probe)

        has_triton = True
    except ImportError:
        has_triton = False
    ops = kda_fla.fla_kda_ops()  # must not raise either way
    if not has_triton:
        assert ops is None, "without triton fla's kernels cannot run; the probe must say so"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="kda_backend"):
        kernels.resolve_kda_backend("cuda-magic", torch.device("cpu"))
