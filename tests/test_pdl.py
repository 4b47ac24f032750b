"""When this package's Triton decode kernels are launched with programmatic dependent launch
(:mod:`modeling_kimi_linear.pdl`): when switched on (``KIMI_LINEAR_PDL=1``; off by default), on CUDA devices of
compute capability >= 9.0 only, never under Triton's interpreter. What the launch does on a GPU (the kernels' PTX waits
before any memory access) is checked by each kernel's sm_90 compile test; its values by ``bench/gpu_check.py``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from modeling_kimi_linear import pdl  # noqa: E402


@pytest.fixture
def hopper(monkeypatch):
    """Pretend every CUDA device is a Hopper GPU (no GPU here), with PDL switched on."""
    monkeypatch.setattr(pdl, "_hopper_or_later", lambda index: True)
    monkeypatch.setenv(pdl.ENV_VAR, "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_off_unless_switched_on(hopper):
    hopper.delenv(pdl.ENV_VAR)
    assert not pdl.enabled(torch.device("cuda", 0))
    hopper.setenv(pdl.ENV_VAR, "1")
    assert pdl.enabled(torch.device("cuda", 0))


def test_cuda_devices_of_hopper_and_later_launch_with_it(hopper):
    assert pdl.enabled(torch.device("cuda", 0))
    assert pdl.launch_options(torch.device("cuda", 1)) == {"PDL": True, "launch_pdl": True}


def test_older_gpus_cpu_tensors_interpreter_and_the_switch_turn_it_off(hopper):
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}
    hopper.setattr(pdl, "_hopper_or_later", lambda index: False)
    assert not pdl.enabled(torch.device("cuda", 0))
    hopper.setattr(pdl, "_hopper_or_later", lambda index: True)
    hopper.setenv("TRITON_INTERPRET", "1")
    assert not pdl.enabled(torch.device("cuda", 0))
    hopper.delenv("TRITON_INTERPRET")
    hopper.setenv(pdl.ENV_VAR, "0")
    assert not pdl.enabled(torch.device("cuda", 0))
    hopper.setenv(pdl.ENV_VAR, "1")
    assert pdl.enabled(torch.device("cuda", 0))
