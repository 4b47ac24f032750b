"""The decoder's residual add + RMSNorm as one Triton launch (modeling_kimi_linear/rms_norm_triton.py) and the
seam that sends the decoder's norms there (``kernels.add_rms_norm``).

The kernel runs on CPU tensors under Triton's interpreter (float32) or on a GPU; without triton, or without either,
those tests skip::

    TRITON_INTERPRET=1 /work/venv-triton/bin/python -m pytest -q tests/test_rms_norm_triton.py

References: the norm written out in float64 here, and ``KimiRMSNorm`` itself (the PyTorch path).
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from conftest import KERNEL_DEVICE, assert_compiles_for_sm90_without_spills, kernel_module
from modeling_kimi_linear import KimiLinearForCausalLM, kernels
from modeling_kimi_linear.norms import KimiRMSNorm
from modeling_kimi_linear.mla_layer import KimiMLAAttention
from modeling_kimi_linear.presets import load_preset

DEVICE = KERNEL_DEVICE


@pytest.fixture(scope="module")
def rnt():
    """The kernel module, where its kernel can run (GPU, or Triton's interpreter on CPU)."""
    return kernel_module("rms_norm_triton")


def norm64(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.double()
    return weight.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("shape", [(1, 1, 2304), (3, 64), (2, 5, 100), (0, 64)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_matches_float64_and_the_module(rnt, shape, with_residual):
    """Rows of 2304 (the release), 64 and 100 (not a power of two), with and without a residual, no rows at all:
    ``h`` is exactly ``residual + x``; ``y`` matches the float64 norm and ``KimiRMSNorm`` to fp32 rounding."""
    gen = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=gen).to(DEVICE)
    residual = torch.randn(*shape, generator=gen).to(DEVICE) if with_residual else None
    norm = KimiRMSNorm(shape[-1], eps=1e-6).to(DEVICE)
    norm.weight.data = torch.randn(shape[-1], generator=gen).to(DEVICE)
    y, h = rnt.add_rms_norm(x, residual, norm.weight.detach(), norm.variance_epsilon)
    want_h = x if residual is None else residual + x
    assert y.shape == x.shape and h.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(h, want_h)
    if x.numel():
        assert (y.double() - norm64(want_h, norm.weight.detach(), 1e-6)).abs().max() < 1e-5
        assert (y - norm(want_h)).abs().max() < 1e-5


@pytest.mark.parametrize("rows,head,width", [(1, 512, 576), (3, 64, 80), (2, 100, 101), (0, 16, 20)])
def test_latent_head_norm_matches_float64_and_the_reference(rnt, rows, head, width):
    """MLA's latent row (512 normed values of 576, the release), other widths (a head that is not a power of two, a
    tail of one value), no rows; the input a strided view of a wider projection output, as the decode step's is:
    the head matches the float64 norm and ``KimiRMSNorm``, the tail is copied exactly (the PyTorch path: split,
    module call, concatenation)."""
    gen = torch.Generator().manual_seed(width)
    wide = torch.randn(rows, 1, width + 7, generator=gen).to(DEVICE)
    x = wide[..., 7:]
    norm = KimiRMSNorm(head, eps=1e-6).to(DEVICE)
    norm.weight.data = torch.randn(head, generator=gen).to(DEVICE)
    y = rnt.rms_norm_head(x, norm.weight.detach(), norm.variance_epsilon)
    want = kernels.rms_norm_head("torch", x, head, norm)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert torch.equal(y[..., head:], x[..., head:])
    if rows:
        assert (y[..., :head].double() - norm64(x[..., :head], norm.weight.detach(), 1e-6)).abs().max() < 1e-5
        assert (y - want).abs().max() < 1e-5


def test_rejects_bad_input(rnt):
    with pytest.raises(ValueError, match="D < W"):
        rnt.rms_norm_head(torch.randn(2, 8).to(DEVICE), torch.ones(8).to(DEVICE), 1e-6)
    x, w = torch.randn(2, 8).to(DEVICE), torch.ones(8).to(DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rnt.add_rms_norm(x, None, torch.ones(9).to(DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rnt.add_rms_norm(x, torch.randn(3, 8).to(DEVICE), w, 1e-6)
    with pytest.raises(ValueError, match="share one of"):
        rnt.add_rms_norm(x, None, w.double(), 1e-6)


def test_model_decode_through_the_seam_matches_module_calls(rnt, monkeypatch, request):
    """A tiny model with ``decode_kernels="triton"`` forced on for CPU tensors (every norm then runs as the kernel:
    two launches a layer, each with the residual add before it, one for the final norm, and one for each MLA layer's
    latent with its shared key part) gives the logits of the same model on the PyTorch path, prompt and decode
    steps."""
    request.getfixturevalue("interpreter_loops_with_numpy_2_4")  # the MLA kernel's loops, under the interpreter
    real = kernels.resolve_decode_kernels
    monkeypatch.setattr(kernels, "resolve_decode_kernels",
                        lambda choice, device: "triton" if choice == "triton" else real(choice, device))
    calls, head_calls = [], []
    fused, fused_head = rnt.add_rms_norm, rnt.rms_norm_head
    monkeypatch.setattr(rnt, "add_rms_norm", lambda *a: calls.append(1) or fused(*a))
    monkeypatch.setattr(rnt, "rms_norm_head", lambda *a: head_calls.append(1) or fused_head(*a))
    config = load_preset("tiny", kda_backend="torch", decode_kernels="torch")
    torch.manual_seed(0)
    ref = KimiLinearForCausalLM(config).eval()
    fast = KimiLinearForCausalLM(config).eval()
    fast.load_state_dict(ref.state_dict())
    for layer in fast.model.layers:
        layer.decode_kernels = "triton"
    fast.model.decode_kernels = "triton"
    mla = [m for m in fast.modules() if isinstance(m, KimiMLAAttention)]
    for m in mla:  # its latent's norm too (and its flash-decoding kernel)
        m.decode_kernels = "triton"
    ids = torch.randint(3, config.vocab_size, (2, 6))
    with torch.no_grad():
        a = fast(ids, use_cache=True)
        b = ref(ids, use_cache=True)
        assert (a.logits - b.logits).abs().max() < 1e-4
        nxt = a.logits[:, -1:].argmax(-1)
        a2 = fast(nxt, past_key_values=a.past_key_values, use_cache=True)
        b2 = ref(nxt, past_key_values=b.past_key_values, use_cache=True)
        assert (a2.logits - b2.logits).abs().max() < 1e-4
    assert mla and len(calls) == 2 * (2 * config.num_hidden_layers + 1) and len(head_calls) == 2 * len(mla)


def test_seam_keeps_the_module_where_it_computes_more(monkeypatch):
    """``plain_rms_norm`` turns down a subclass, hooks (accelerate's too), other dtypes, autocast and autograd;
    CPU tensors never reach the kernel."""
    norm = KimiRMSNorm(8)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert kernels.plain_rms_norm(x, None, norm) and kernels.plain_rms_norm(x, x, norm)
        assert not kernels.plain_rms_norm(x, x.double(), norm)
        assert not kernels.plain_rms_norm(x.double(), None, norm)

        class Sub(KimiRMSNorm):
            pass

        assert not kernels.plain_rms_norm(x, None, Sub(8))
        handle = norm.register_forward_hook(lambda m, a, o: None)
        assert not kernels.plain_rms_norm(x, None, norm)
        handle.remove()
        norm._hf_hook = object()
        assert not kernels.plain_rms_norm(x, None, norm)
        del norm._hf_hook
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kernels.plain_rms_norm(x, None, norm)
    assert not kernels.plain_rms_norm(x, None, norm)  # the weight wants a gradient
    y, h = kernels.add_rms_norm("auto", x, x, norm)  # CPU: the module
    assert torch.equal(h, x + x) and torch.equal(y, norm(x + x))
    assert kernels.add_rms_norm("auto", x, None, nn.LayerNorm(8))[1] is x  # any norm module on the PyTorch path


COMPILE_SETUP = r"""
from modeling_kimi_linear import rms_norm_triton as m
fn, names = m._add_rms_norm, m._add_rms_norm.arg_names
head = sys.argv[1] == "latent"  # MLA's latent row: 512 normed values of 576, rows 576 apart (else a 2304 row)
const = {"HAS_RESIDUAL": not head, "BLOCK": 512 if head else 4096, "TAIL": 64 if head else 0}
ptr = {"x_ptr", "r_ptr", "h_ptr", "y_ptr", "w_ptr"}
signature = {n: "constexpr" if n in const else "*bf16" if n in ptr else "fp32" if n == "eps" else "i32"
             for n in names}
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptr | {"D", "stride_x", "W"}}
options = {"num_warps": 2 if head else 16}
"""


@pytest.mark.parametrize("row", ["decoder", "latent"])
def test_kernel_compiles_for_sm90_without_spills(tmp_path, row):
    """The release's decoder row (2304 values in a 4096 block, 16 warps) and MLA latent row (512 normed values,
    64 copied) compile for sm_90 and stay in registers."""
    assert_compiles_for_sm90_without_spills(tmp_path, COMPILE_SETUP, row)
