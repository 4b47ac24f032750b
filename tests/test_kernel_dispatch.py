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
    monkeypatch.setattr(kernels, "fla_module_ops", _exploding_ops)  # causal_conv1d, rms_norm_gated
    monkeypatch.setattr(kda_fla, "fla_module_ops", _exploding_ops)


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
    kda_fla.fla_module_ops.cache_clear()
    ops, module_ops = kda_fla.fla_kda_ops(), kda_fla.fla_module_ops()  # must not raise either way
    if not has_triton:
        assert ops is None, "without triton fla's kernels cannot run; the probe must say so"
        assert module_ops is None


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="kda_backend"):
        kernels.resolve_kda_backend("cuda-magic", torch.device("cpu"))


def test_decode_kernels_resolve_by_device_and_choice(monkeypatch):
    """This package's Triton decode kernels: never for CPU tensors, a clear error when forced there, and
    ``"auto"`` on CUDA only when triton imports."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.resolve_decode_kernels("auto", cpu) == "torch"
    assert kernels.resolve_decode_kernels("torch", cuda) == "torch"
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        kernels.resolve_decode_kernels("triton", cpu)
    with pytest.raises(ValueError, match="decode_kernels='fast'"):
        kernels.resolve_decode_kernels("fast", cpu)
    monkeypatch.setattr(kernels, "triton_imports", lambda: False)
    assert kernels.resolve_decode_kernels("auto", cuda) == "torch"
    with pytest.raises(RuntimeError, match="triton does not import"):
        kernels.resolve_decode_kernels("triton", cuda)
    monkeypatch.setattr(kernels, "triton_imports", lambda: True)
    assert kernels.resolve_decode_kernels("auto", cuda) == "triton"


def test_mla_decode_kernel_never_serves_cpu_tensors_or_the_torch_choice(monkeypatch):
    """MLA decode steps on CPU tensors run the PyTorch path even with triton importable; with the device treated
    as CUDA, ``decode_kernels="torch"`` still keeps the PyTorch path and ``"auto"`` takes the kernel."""
    monkeypatch.setattr(kernels, "triton_imports", lambda: True)  # as if triton were installed

    def kernel_called(*args, **kwargs):
        raise AssertionError("the Triton MLA decode kernel was called")

    monkeypatch.setattr(kernels, "mla_decode", kernel_called)
    model = KimiLinearForCausalLM(load_preset("tiny")).eval()
    assert model.model.layers[3].self_attn.decode_kernels == "auto"
    with torch.no_grad():
        out = model.generate(torch.randint(3, 512, (2, 9)), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 12)

    resolve = kernels.resolve_decode_kernels
    monkeypatch.setattr(kernels, "resolve_decode_kernels", lambda choice, device: resolve(choice, torch.device("cuda")))
    layer = model.model.layers[3].self_attn
    q = torch.randn(1, layer.num_heads, 1, layer.q_dim)
    latent = torch.randn(1, 5, layer.kv_lora_rank + layer.rope_dim)
    layer.decode_kernels = "torch"
    assert layer.attend_latent(q, latent, None).shape == (1, layer.num_heads, 1, layer.v_dim)
    layer.decode_kernels = "auto"
    with pytest.raises(AssertionError, match="kernel was called"):
        layer.attend_latent(q, latent, None)


def test_triton_kernel_modules_do_not_make_remote_code_require_triton():
    """Checkpoints carry ``*_triton.py`` (relative imports); transformers' remote-code loader checks every carried
    module's imports and refuses to load when one is missing, so triton must not be among them (a CPU machine
    without triton must load the model)."""
    from pathlib import Path

    from transformers.dynamic_module_utils import get_imports

    modules = sorted(Path(kernels.__file__).parent.glob("*_triton.py"))
    assert modules, "no Triton kernel module found"
    for path in modules:
        assert "triton" not in get_imports(path), path.name


def test_decode_kernels_default_stays_out_of_config_json():
    """Like ``kda_gate_granularity``: a default config's JSON stays what other implementations read."""
    from modeling_kimi_linear.presets import load_preset

    assert "decode_kernels" not in load_preset("tiny").to_dict()
    assert load_preset("tiny", decode_kernels="torch").to_dict()["decode_kernels"] == "torch"


def test_fused_kda_decode_only_for_cuda_tensors_with_triton_and_fla(monkeypatch):
    """The fused KDA decode step: never for CPU tensors (even with triton and fla importable), a clear error when
    forced there, and on CUDA only when decode_kernels resolves to triton and kda_backend not to torch."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(kernels, "triton_imports", lambda: True)
    monkeypatch.setattr(kernels, "fla_kda_ops", lambda: (object(), object()))
    assert not kernels.fused_kda_decode("auto", "auto", cpu)
    assert not kernels.fused_kda_decode("auto", "fla", cpu)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        kernels.fused_kda_decode("triton", "auto", cpu)
    assert kernels.fused_kda_decode("auto", "auto", cuda)
    assert kernels.fused_kda_decode("triton", "fla", cuda)
    assert not kernels.fused_kda_decode("torch", "fla", cuda)
    assert not kernels.fused_kda_decode("auto", "torch", cuda)  # kda_backend="torch": the reference throughout
    monkeypatch.setattr(kernels, "fla_kda_ops", lambda: None)
    with pytest.warns(UserWarning, match="flash-linear-attention is not installed"):
        monkeypatch.setattr(kernels, "_warned_missing_fla", False)
        assert not kernels.fused_kda_decode("auto", "auto", cuda)


def test_cpu_decode_never_takes_the_fused_kda_step(monkeypatch, fla_importable_but_broken):
    """CPU decoding with triton 'installed': every KDA decode step stays on the PyTorch path, and the kernel
    module is never imported."""
    import sys

    from modeling_kimi_linear import kda_layer

    def boom(*args, **kwargs):
        raise AssertionError("the fused KDA decode step ran for CPU tensors")

    monkeypatch.setattr(kernels, "triton_imports", lambda: True)
    monkeypatch.setattr(kernels, "kda_decode_step", boom)
    monkeypatch.setattr(kda_layer, "kda_decode_step", boom)
    monkeypatch.delitem(sys.modules, "modeling_kimi_linear.kda_decode_triton", raising=False)
    model = KimiLinearForCausalLM(load_preset("tiny")).eval()
    assert model.model.layers[0].self_attn.decode_kernels == "auto"
    with torch.no_grad():
        out = model.generate(torch.randint(3, 512, (2, 9)), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, 13)
    assert "modeling_kimi_linear.kda_decode_triton" not in sys.modules


def test_checkpoint_code_does_not_require_triton():
    """transformers' remote-code loader refuses a checkpoint whose module files import a missing package (outside
    try blocks); the Triton kernel modules are copied into checkpoints with the rest, so they must pass on a
    machine without triton."""
    from pathlib import Path

    from transformers.dynamic_module_utils import get_imports

    import modeling_kimi_linear

    for path in sorted(Path(modeling_kimi_linear.__file__).parent.glob("*.py")):
        assert "triton" not in get_imports(path), path.name


def test_padded_route_unpads_fla_prompts_but_not_training_steps(monkeypatch):
    """fla prompts run unpadded; a padded training batch keeps its shape (the unpadded token count would change
    every step, and fla autotunes anew for each count), as do the PyTorch kernels and single-token steps."""
    assert kernels.unpads("fla", 100, training=False)
    assert not kernels.unpads("fla", 100, training=True)
    assert not kernels.unpads("fla", 1, training=False)
    assert not kernels.unpads("torch", 100, training=False)
    seen = []
    monkeypatch.setattr(kernels, "unpads", lambda backend, seqlen, training: seen.append(training) or False)
    q, k, v, g, beta = (torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4),
                        -torch.rand(2, 8, 2, 4), torch.rand(2, 8, 2))
    mask = torch.ones(2, 8, dtype=torch.bool)
    kernels.kda_padded(q, k, v, g, beta, mask, backend="torch")
    kernels.kda_padded(q.requires_grad_(), k, v, g, beta, mask, backend="torch")
    with torch.no_grad():
        kernels.kda_padded(q, k, v, g, beta, mask, backend="torch")
    assert seen == [False, True, False]


@pytest.mark.parametrize("with_state", [False, True])
def test_padded_batch_unpadded_equals_zero_gates(with_state):
    """The two exact routes of kernels.kda_padded (cu_seqlens unpadding, used with fla; zero gates) agree, on the
    torch kernels, for left and right padding and a hole; padded positions output 0 when unpadded."""
    torch.manual_seed(0)
    bsz, seqlen, heads, dim = 3, 70, 2, 16
    q, k, v = (torch.randn(bsz, seqlen, heads, dim) for _ in range(3))
    g = -torch.rand(bsz, seqlen, heads, dim)
    beta = torch.rand(bsz, seqlen, heads)
    mask = torch.ones(bsz, seqlen, dtype=torch.bool)
    mask[0, :9] = False  # left padding
    mask[1, 50:] = False  # right padding
    mask[2, 20:23] = False  # a hole
    state = torch.randn(bsz, heads, dim, dim) if with_state else None
    runs = {
        unpad: kernels.kda_padded(q, k, v, g, beta, mask, backend="torch", initial_state=state,
                                  output_final_state=True, unpad=unpad)
        for unpad in (False, True)
    }
    (o_gate, s_gate), (o_unpad, s_unpad) = runs[False], runs[True]
    assert (o_unpad[mask] - o_gate[mask]).abs().max().item() <= 1e-5
    assert (s_unpad - s_gate).abs().max().item() <= 1e-5
    assert torch.count_nonzero(o_unpad[~mask]) == 0
    # and row 0 equals its real tokens run alone
    alone, alone_state = kernels.kda(q[:1, 9:], k[:1, 9:], v[:1, 9:], g[:1, 9:], beta[:1, 9:], backend="torch",
                                     initial_state=None if state is None else state[:1], output_final_state=True)
    assert (o_unpad[0, 9:] - alone[0]).abs().max().item() <= 1e-5
    assert (s_unpad[0] - alone_state[0]).abs().max().item() <= 1e-5


def test_padded_batch_auto_route_is_zero_gates_on_cpu_and_rows_without_tokens_work():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 8, 1, 4) for _ in range(3))
    g, beta = -torch.rand(2, 8, 1, 4), torch.rand(2, 8, 1)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1] = False  # a row of padding only: its state stays the initial one on either route
    state = torch.randn(2, 1, 4, 4)
    for unpad in (None, True):
        o, final = kernels.kda_padded(q, k, v, g, beta, mask, backend="auto", initial_state=state,
                                      output_final_state=True, unpad=unpad)
        assert torch.allclose(final[1], state[1])
        assert o.shape == v.shape


def test_warmup_runs_every_pass(monkeypatch, capsys):
    """model.warmup()'s GPU kernel priming runs its prefill, continuation, decode and padded passes (run on CPU at
    short lengths here, to check the calls themselves); on a CPU warmup() itself runs nothing, or with
    compile_cpu_decode one short prompt and one decode step."""
    from modeling_kimi_linear.presets import load_preset

    monkeypatch.setattr(kda_fla, "warmup_lengths", lambda: (1, 65))
    calls = []
    model = KimiLinearForCausalLM(load_preset("tiny")).eval()
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                    with_kwargs=True)
    model._warmup_kernels(1, padded=True, progress=True)
    assert calls == [(1, 1), (1, 1), (1, 1), (1, 65), (1, 65), (1, 1), (2, 65)]
    progress = capsys.readouterr().err
    assert "warmup (compiling kernels)" in progress and "7/7" in progress
    calls.clear()
    model.warmup()
    assert calls == []
    model.compile_cpu_decode = True
    monkeypatch.setattr(KimiLinearForCausalLM, "_static_decoder_for", lambda *args: None)  # no compiling here
    model.warmup(batch_size=2)
    assert calls == [(2, 8), (2, 1)]


def test_varlen_bucketing_leaves_every_sequence_unchanged():
    """fla's varlen prefill is padded to a bucket with neutral tokens on the last sequence; checked here with the
    torch kernel standing in for fla's chunk_kda (same call signature)."""
    from modeling_kimi_linear.kda_torch import kda_chunk_torch

    def chunk_kda(q, k, v, g, beta, *, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                  cu_seqlens):
        seen.append(q.shape[1])
        return kda_chunk_torch(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm_in_kernel,
                               cu_seqlens=cu_seqlens)

    torch.manual_seed(0)
    total, heads, dim = 300, 2, 16
    q, k, v = (torch.randn(1, total, heads, dim) for _ in range(3))
    g, beta = -torch.rand(1, total, heads, dim), torch.rand(1, total, heads)
    cu = torch.tensor([0, 120, 250, 300], dtype=torch.int32)
    state = torch.randn(3, heads, dim, dim)
    seen = []
    o, final = kda_fla._bucketed_varlen_chunk_kda(chunk_kda, q, k, v, g, beta, None, state, True, True, cu)
    want, want_final = kda_chunk_torch(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                       cu_seqlens=cu)
    assert seen == [kda_fla.BUCKETS[0]] and o.shape == want.shape
    assert (o - want).abs().max().item() <= 1e-5
    assert (final - want_final).abs().max().item() <= 1e-5



def test_gated_norm_slices_rows_so_fla_compiles_one_variant(monkeypatch):
    """fla's gated norm compiles one kernel per ceil(rows / 65536); the wrapper feeds it slices of at most
    NORM_SLICE_ROWS rows, with the same result as one call. The PyTorch reference (rows normalised independently)
    stands in for fla's kernel, same call signature."""
    from modeling_kimi_linear.norms import gated_rms_normalize

    def rms_norm_gated(x, g, weight, bias, *, activation, eps):
        assert bias is None and activation == "sigmoid"
        seen.append(x.shape[0])
        return gated_rms_normalize(x, g, weight, eps)

    monkeypatch.setattr(kda_fla, "fla_module_ops", lambda: (None, rms_norm_gated))
    monkeypatch.setattr(kda_fla, "NORM_SLICE_ROWS", 12)
    torch.manual_seed(0)
    o, gate, weight = torch.randn(2, 15, 1, 8), torch.randn(2, 15, 1, 8), torch.rand(8) + 0.5
    for rows, calls in ((30, [12, 12, 6]), (12, [12]), (5, [5])):
        seen = []
        flat = (o.reshape(-1, 8)[:rows], gate.reshape(-1, 8)[:rows])
        out = kda_fla.gated_rms_norm_fla(*flat, weight, 1e-6)
        assert seen == calls
        assert torch.allclose(out, gated_rms_normalize(*flat, weight, 1e-6), atol=1e-6)
    assert kda_fla.gated_rms_norm_fla(o, gate, weight, 1e-6).shape == o.shape
