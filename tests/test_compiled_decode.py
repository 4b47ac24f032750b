"""Compiled CPU decode (modeling_kimi_linear/compiled_decode.py, ``model.compile_cpu_decode``).

The forms that only run inside a compiled step (MLA's latent attention as broadcast sums, the MoE's chosen experts
as broadcast sums) are checked eagerly against the ordinary forms; the compiled step itself (tens of seconds of
compiling) is a slow test against ordinary op-by-op decoding.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from modeling_kimi_linear import compiled_decode
from modeling_kimi_linear.moe import KimiExperts
from test_cache_generate import MIXES, ids, tiny_model


def test_fused_latent_attention_equals_batched_products(monkeypatch):
    """``attend_latent`` as the compiled CPU step writes it equals its bmm form, with a padding mask."""
    model = tiny_model(MIXES["3:1"])
    mla = model.model.layers[3].self_attn
    torch.manual_seed(0)
    q = torch.randn(2, mla.num_heads, 1, mla.q_dim)
    latent = torch.randn(2, 37, mla.kv_lora_rank + mla.rope_dim)
    mask = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    mask[1, ..., :5] = False
    with torch.no_grad():
        want = mla.attend_latent(q, latent, mask)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        got = mla.attend_latent(q, latent, mask)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_gathered_experts_equal_per_copy_and_grouped():
    torch.manual_seed(0)
    experts = KimiExperts(num_experts=6, hidden_size=16, intermediate_size=8, hidden_act="silu")
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
        x = torch.randn(2, 16)
        chosen = torch.tensor([[4, 1], [0, 4]])
        weights = torch.rand(2, 2)
        want = experts.per_copy(x, chosen, weights)
        got = experts.gathered(x, chosen, weights)
        with torch.enable_grad():  # the grouped / per-expert route (not the decode one)
            grouped = experts(x, chosen, weights).detach()
    scale = want.abs().max().item()  # outputs reach ~60: fp32 rounding of different summation orders is relative
    assert (got - want).abs().max().item() <= 1e-6 * scale
    assert (grouped - want).abs().max().item() <= 1e-6 * scale


@pytest.mark.slow
def test_compiled_decode_equals_ordinary_decode_and_generate():
    """A left-padded batch of two decoded over the 256-row bucket boundary, compiled and op by op; then greedy
    ``generate()`` both ways."""
    model = tiny_model(MIXES["3:1"])
    batch, prompt = 2, 250
    x = ids(batch, prompt, seed=1)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    mask[1, :9] = 0
    worst = 0.0
    with torch.no_grad():
        first = model(x, attention_mask=mask)
        caches = {False: first.past_key_values, True: model(x, attention_mask=mask).past_key_values}
        token = first.logits[:, -1:].argmax(-1)
        for _ in range(12):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            logits = {}
            for compiled in (False, True):
                model.compile_cpu_decode = compiled
                logits[compiled] = model(token, attention_mask=mask, past_key_values=caches[compiled]).logits
            worst = max(worst, (logits[True] - logits[False]).abs().max().item())
            token = logits[False][:, -1:].argmax(-1)
        assert "_compiled_decoder" in model.__dict__
        assert caches[True].get_seq_length() == caches[False].get_seq_length() == prompt + 12
        for layer in range(3):
            state_a, state_b = caches[False].kda_state(layer)[1], caches[True].kda_state(layer)[1]
            assert (state_a - state_b).abs().max().item() <= 1e-5
        sequences = {}
        for compiled in (False, True):
            model.compile_cpu_decode = compiled
            sequences[compiled] = model.generate(x, attention_mask=mask[:, :prompt], max_new_tokens=20,
                                                 do_sample=False, pad_token_id=0)
    assert worst <= 1e-5
    assert torch.equal(sequences[True], sequences[False])


def test_a_failing_compile_falls_back_to_op_by_op_decoding(monkeypatch, tmp_path):
    """Where the step cannot be compiled (no C++ compiler, say), one warning and the ordinary decode step."""
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken_compile)
    monkeypatch.setenv(compiled_decode.PROGRAM_DIR_ENV, str(tmp_path))  # no program compiled earlier is found
    model = tiny_model(MIXES["3:1"])
    x = ids(1, 20)
    with torch.no_grad():
        out = model(x)
        token = out.logits[:, -1:].argmax(-1)
        want = model(token, past_key_values=model(x).past_key_values).logits
        model.compile_cpu_decode = True
        with pytest.warns(RuntimeWarning, match="no working C\\+\\+ compiler"):
            got = model(token, past_key_values=out.past_key_values).logits
        with warnings.catch_warnings(record=True) as later:
            warnings.simplefilter("always")
            again = model(token, past_key_values=out.past_key_values).logits
    assert not [w for w in later if "compile_cpu_decode" in str(w.message)]  # warned once only
    assert (got - want).abs().max().item() <= 1e-5
    assert out.past_key_values.get_seq_length() == 22 and again.shape == got.shape


def test_export_traces_plain_weights_down_the_plain_expert_path(monkeypatch, tmp_path):
    """torch.export shows each plain weight as a FakeTensor: it must still count as plain, or the traced experts
    take the quantized path (a dequantize per expert weight in the program, proxy-executor warnings)."""
    from modeling_kimi_linear import moe

    exported = []

    def stop_after_export(program, **kwargs):  # noqa: ANN001
        exported.append(program)
        raise RuntimeError("stop: the export is what this test looks at")

    quantized_calls = []
    original = moe.quantized_experts_forward
    monkeypatch.setattr(moe, "quantized_experts_forward",
                        lambda *a, **k: quantized_calls.append(1) or original(*a, **k))
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", stop_after_export)
    monkeypatch.setenv(compiled_decode.PROGRAM_DIR_ENV, str(tmp_path))
    model = tiny_model(MIXES["3:1"])
    x = ids(1, 20)
    with torch.no_grad():
        out = model(x)
        model.compile_cpu_decode = True
        with pytest.warns(RuntimeWarning, match="stop: the export"):
            model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
    assert len(exported) == 1 and not quantized_calls
    targets = {str(node.target) for node in exported[0].graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "dequantize" in t], sorted(targets)


@pytest.mark.slow
def test_compiled_decode_reads_the_models_current_weights():
    """The compiled program holds no weights of its own: a weight changed in place is seen at once, a replaced
    parameter or one moved to new memory from the next cache on (each generate() call makes one)."""
    model = tiny_model(MIXES["3:1"])
    x = ids(2, 30, seed=2)
    proj = model.model.layers[3].self_attn.o_proj

    def decode(compiled: bool) -> torch.Tensor:
        model.compile_cpu_decode = compiled
        with torch.no_grad():
            out = model(x)
            return model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values).logits

    first = decode(True)
    assert (first - decode(False)).abs().max().item() <= 1e-5
    with torch.no_grad():
        proj.weight.mul_(3.0)
    scaled = decode(True)
    assert (scaled - first).abs().max().item() > 1e-3
    assert (scaled - decode(False)).abs().max().item() <= 1e-5
    proj.weight = torch.nn.Parameter(-proj.weight.detach().clone())
    replaced = decode(True)
    assert (replaced - scaled).abs().max().item() > 1e-3
    assert (replaced - decode(False)).abs().max().item() <= 1e-5
    proj.weight.data = proj.weight.detach() * 0.5  # the same Parameter object at new memory (what .to() does)
    moved = decode(True)
    assert (moved - replaced).abs().max().item() > 1e-3
    assert (moved - decode(False)).abs().max().item() <= 1e-5


def test_compiled_program_key_ignores_where_a_model_came_from(tmp_path):
    """The configuration part of a program's key: the same for a model saved and loaded from elsewhere with
    use_cache switched off (as Trainer leaves it), different when an architectural value differs."""
    from modeling_kimi_linear import KimiLinearForCausalLM

    model = tiny_model(MIXES["3:1"])
    model.config.use_cache = False
    model.save_pretrained(tmp_path / "elsewhere")
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path / "elsewhere")
    loaded.config.use_cache = True
    assert compiled_decode._traced_config(loaded.config) == compiled_decode._traced_config(model.config)
    other = tiny_model(MIXES["3:1"], routed_scaling_factor=2.0)
    assert compiled_decode._traced_config(other.config) != compiled_decode._traced_config(model.config)
