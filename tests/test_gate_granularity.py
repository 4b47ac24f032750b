"""``kda_gate_granularity``: per-channel KDA (released) vs a per-head scalar forget gate (Gated DeltaNet).

The per-head layer is checked against a float64 Gated DeltaNet recurrence written here in its paper form
``S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T`` (scalar ``a_t`` per head), with the short convolution,
L2 norm, gated RMSNorm and projections re-derived from the weights. The channel default is covered by the rest of
the suite (unchanged); here we also check that its config and parameters are what they were.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from modeling_kimi_linear import KimiLinearForCausalLM
from modeling_kimi_linear.configuration_kimi_linear import KimiLinearConfig
from modeling_kimi_linear.presets import load_preset

KDA, MLA = "linear_attention", "full_attention"
HEADS, HEAD_DIM = 2, 16


def tiny_config(gate: str = "head", layer_types=None, **overrides) -> KimiLinearConfig:
    layer_types = layer_types or [KDA, KDA]
    kwargs = dict(
        layer_types=layer_types,
        num_hidden_layers=len(layer_types),
        linear_attn_config={"head_dim": HEAD_DIM, "num_heads": HEADS, "short_conv_kernel_size": 4},
        kda_gate_granularity=gate,
        kda_backend="torch",
    )
    kwargs.update(overrides)
    return load_preset("tiny", **kwargs)


def tiny_model(gate: str = "head", layer_types=None, seed: int = 0, **overrides) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(tiny_config(gate, layer_types, **overrides)).eval()
    with torch.no_grad():  # decays and norms far from their init so the test sees every parameter
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "A_log"):
                attn.A_log.uniform_(-1.0, 1.0)
                attn.dt_bias.normal_(0.0, 1.0)
                attn.f_b_proj.weight.normal_(0.0, 0.5)
                attn.o_norm.weight.add_(0.2 * torch.randn_like(attn.o_norm.weight))
    return model


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad", ["channels", "per_head", "", None, 1])
def test_bad_granularity_is_one_error_naming_the_field(bad):
    with pytest.raises(ValueError, match="kda_gate_granularity"):
        KimiLinearConfig(kda_gate_granularity=bad)


def test_default_is_channel_and_is_not_written(tmp_path):
    config = tiny_config("channel")
    assert config.kda_gate_granularity == "channel"
    assert "kda_gate_granularity" not in config.to_dict()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "kda_gate_granularity" not in saved
    # native transformers reads exactly what it read before the field existed
    from transformers import KimiLinearConfig as NativeConfig

    native = NativeConfig.from_pretrained(tmp_path)
    assert not hasattr(native, "kda_gate_granularity")
    assert native.linear_num_heads == HEADS and native.linear_head_dim == HEAD_DIM


def test_released_config_json_loads_as_channel():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configuration" / "kimi_linear_48b_a3b.json"
    assert "kda_gate_granularity" not in json.loads(path.read_text())
    assert KimiLinearConfig.from_json_file(str(path)).kda_gate_granularity == "channel"


def test_head_round_trips_through_dict_and_json(tmp_path):
    config = tiny_config("head")
    out = config.to_dict()
    assert out["kda_gate_granularity"] == "head"
    assert KimiLinearConfig.from_dict(out).kda_gate_granularity == "head"
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["kda_gate_granularity"] == "head"
    assert KimiLinearConfig.from_pretrained(tmp_path).kda_gate_granularity == "head"


# ---------------------------------------------------------------------------------------------- parameters
def test_gate_parameter_shapes_and_counts():
    hidden = tiny_config().hidden_size
    head = tiny_model("head").model.layers[0].self_attn
    chan = tiny_model("channel").model.layers[0].self_attn
    assert tuple(head.f_a_proj.weight.shape) == (HEAD_DIM, hidden)
    assert tuple(head.f_b_proj.weight.shape) == (HEADS, HEAD_DIM)
    assert tuple(head.dt_bias.shape) == (HEADS,)
    assert tuple(head.A_log.shape) == (1, 1, HEADS, 1)
    assert tuple(chan.f_b_proj.weight.shape) == (HEADS * HEAD_DIM, HEAD_DIM)
    assert tuple(chan.dt_bias.shape) == (HEADS * HEAD_DIM,)

    def gate_params(attn):
        return sum(p.numel() for n, p in attn.named_parameters() if n.split(".")[0] in
                   ("f_a_proj", "f_b_proj", "dt_bias", "A_log"))

    # D*K + K*(H*K) + H*K + H  vs  D*K + K*H + H + H
    assert gate_params(chan) == hidden * HEAD_DIM + HEAD_DIM * HEADS * HEAD_DIM + HEADS * HEAD_DIM + HEADS
    assert gate_params(head) == hidden * HEAD_DIM + HEAD_DIM * HEADS + HEADS + HEADS
    # everything outside the gate is identical
    rest = lambda attn: {n: tuple(p.shape) for n, p in attn.named_parameters()  # noqa: E731
                         if n.split(".")[0] not in ("f_b_proj", "dt_bias")}
    assert rest(head) == rest(chan)


def test_bf16_cast_keeps_gate_parameters_fp32():
    model = tiny_model("head").to(torch.bfloat16)
    attn = model.model.layers[0].self_attn
    assert attn.A_log.dtype == attn.dt_bias.dtype == torch.float32
    assert attn.f_b_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(ids(1, 30), use_cache=False).logits.float()).all()


# ------------------------------------------------------------------------------------- independent reference
def _causal_depthwise_conv(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``y[t, c] = sum_j taps[c, j] * x[t - (W - 1) + j, c]`` (zeros before the start), then SiLU."""
    seqlen, width = x.shape[1], taps.shape[-1]
    y = torch.zeros_like(x)
    for j in range(width):
        shift = width - 1 - j
        y[:, shift:] += x[:, : seqlen - shift] * taps[:, j]
    return y * torch.sigmoid(y)


def reference_gdn_layer(attn, x: torch.Tensor, eps_norm: float) -> torch.Tensor:
    """The per-head-gated layer in float64, token by token, from its weights (paper form of Gated DeltaNet)."""
    d = lambda t: t.detach().double()  # noqa: E731
    x = d(x)
    bsz, seqlen, _ = x.shape
    heads, dim = HEADS, HEAD_DIM

    def heads_of(t):
        return t.reshape(bsz, seqlen, heads, dim)

    def unit(t):
        return t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)

    q = unit(heads_of(_causal_depthwise_conv(x @ d(attn.q_proj.weight).T, d(attn.q_conv1d.weight)[:, 0])))
    k = unit(heads_of(_causal_depthwise_conv(x @ d(attn.k_proj.weight).T, d(attn.k_conv1d.weight)[:, 0])))
    v = heads_of(_causal_depthwise_conv(x @ d(attn.v_proj.weight).T, d(attn.v_conv1d.weight)[:, 0]))
    pre = x @ d(attn.f_a_proj.weight).T @ d(attn.f_b_proj.weight).T + d(attn.dt_bias)  # [B, T, H]
    rate = torch.exp(d(attn.A_log).reshape(heads))
    alpha = torch.exp(-rate * torch.log1p(torch.exp(pre)))  # one scalar per (token, head), in (0, 1]
    beta = torch.sigmoid(x @ d(attn.b_proj.weight).T)
    eye = torch.eye(dim, dtype=torch.float64)
    outs = torch.zeros(bsz, seqlen, heads, dim, dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            state = torch.zeros(dim, dim, dtype=torch.float64)
            for t in range(seqlen):
                kt, vt, bt = k[b, t, h], v[b, t, h], beta[b, t, h]
                state = alpha[b, t, h] * (eye - bt * torch.outer(kt, kt)) @ state + bt * torch.outer(kt, vt)
                outs[b, t, h] = state.T @ q[b, t, h] / math.sqrt(dim)
    gate = heads_of(x @ d(attn.g_a_proj.weight).T @ d(attn.g_b_proj.weight).T)
    normed = outs / torch.sqrt((outs * outs).mean(-1, keepdim=True) + eps_norm)
    y = normed * d(attn.o_norm.weight) * torch.sigmoid(gate)
    return y.reshape(bsz, seqlen, heads * dim) @ d(attn.o_proj.weight).T


def test_head_layer_equals_float64_gated_deltanet_recurrence():
    model = tiny_model("head", seed=1)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 70, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    expected = reference_gdn_layer(attn, x, model.config.rms_norm_eps)
    with torch.no_grad():
        got64 = attn.double()(x.double())  # gate parameters stay fp32, so the gate is fp32-accurate
        got32 = attn.float()(x)
    scale = expected.abs().max().item()
    assert scale > 1e-3  # the output is not trivially zero
    assert (got64 - expected).abs().max().item() <= 1e-6 * max(scale, 1.0)
    assert (got32.double() - expected).abs().max().item() <= 1e-4 * max(scale, 1.0)
    # the decay really varies per head and per token, so the test would notice a constant or shared gate
    g = attn.forget_gate(x)
    assert g.shape == (2, 70, HEADS, HEAD_DIM)
    assert torch.equal(g, g[..., :1].expand_as(g))
    assert g[..., 0].std(dim=1).min().item() > 1e-3 and (g[..., 0, 0] - g[..., 1, 0]).abs().max().item() > 1e-3


def test_head_gate_equals_channel_gate_with_tied_channels():
    """A channel model whose gate rows are the per-head rows repeated over K computes the same function."""
    head_model = tiny_model("head", seed=2)
    chan_model = tiny_model("channel", seed=5)
    state = head_model.state_dict()
    for name, value in list(state.items()):
        if name.endswith(("self_attn.f_b_proj.weight", "self_attn.dt_bias")):
            state[name] = value.repeat_interleave(HEAD_DIM, dim=0)
    chan_model.load_state_dict(state)
    x = ids(2, 90)
    with torch.no_grad():
        a = head_model(x, use_cache=False).logits
        b = chan_model(x, use_cache=False).logits
    assert (a - b).abs().max().item() <= 1e-5
    # and untied channels give a different function (the switch is not a no-op)
    with torch.no_grad():
        for layer in chan_model.model.layers:
            layer.self_attn.dt_bias.add_(torch.randn_like(layer.self_attn.dt_bias))
        c = chan_model(x, use_cache=False).logits
    assert (a - c).abs().max().item() > 1e-3


def test_gradients_reach_the_per_head_gate():
    model = tiny_model("head").train()
    x = ids(2, 40)
    model(x, labels=x, use_cache=False).loss.backward()
    attn = model.model.layers[0].self_attn
    for name in ("f_a_proj.weight", "f_b_proj.weight", "dt_bias", "A_log"):
        grad = attn.get_parameter(name).grad
        assert grad is not None and grad.abs().sum().item() > 0, name


# ---------------------------------------------------------------------------------- cache, generate, save
@pytest.mark.parametrize("mix", [[KDA, KDA], [KDA, MLA, KDA]], ids=["all_linear", "hybrid"])
def test_cache_and_generate_match_full_forward(mix):
    model = tiny_model("head", mix, seed=4)
    prompt = ids(2, 23, seed=7)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=17, do_sample=False, pad_token_id=0)
        full = model(generated, use_cache=False).logits
        # chunked prefill + token-by-token decode through the cache equals the full forward
        out = model(generated[:, :11])
        parts = [out.logits]
        for t in range(11, generated.shape[1]):
            out = model(generated[:, t : t + 1], past_key_values=out.past_key_values)
            parts.append(out.logits)
    assert generated.shape == (2, 40)
    assert torch.equal(full[:, 22:-1].argmax(-1), generated[:, 23:])
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5


def test_left_padding_changes_nothing():
    model = tiny_model("head", seed=6)
    row = ids(1, 30, seed=8)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(row, use_cache=False).logits
        b = model(padded, attention_mask=mask, use_cache=False).logits[:, 5:]
    assert (a - b).abs().max().item() <= 1e-5


def test_save_load_round_trip(tmp_path):
    model = tiny_model("head", seed=9)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["kda_gate_granularity"] == "head"
    loaded = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.kda_gate_granularity == "head"
    assert tuple(loaded.model.layers[0].self_attn.dt_bias.shape) == (HEADS,)
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    x = ids(1, 33)
    with torch.no_grad():
        assert torch.equal(model(x, use_cache=False).logits, loaded(x, use_cache=False).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FLA kernels)")
def test_fla_kernels_accept_the_broadcast_gate():
    from modeling_kimi_linear.kda_fla import fla_kda_ops

    if fla_kda_ops() is None:
        pytest.skip("flash-linear-attention does not import")
    model = tiny_model("head", seed=10).cuda()
    x = ids(2, 200).cuda()
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
        for layer in model.model.layers:
            layer.self_attn.backend = "fla"
        got = model(x, use_cache=False).logits
    assert (got - ref).abs().max().item() <= 2e-3 * max(ref.abs().max().item(), 1.0)
