"""The MoE's Triton decode kernels (modeling_kimi_linear/moe_decode_triton.py) and how the model reaches them.

The kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, float32: the interpreter's
``tl.dot`` on bf16 is wrong) or on a GPU; without triton, or without either, those tests skip::

    TRITON_INTERPRET=1 /work/venv-triton/bin/python -m pytest -q tests/test_moe_decode_triton.py

References: a float64 token-by-token sum written here, ``KimiExperts.per_copy`` / the grouped path, and
``KimiMoEGate`` (router) on scores whose choice is not within rounding of a tie. The dispatch tests run anywhere:
CPU tensors never reach the Triton module, and the conditions that send a call there are the documented ones.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import KERNEL_DEVICE, LaunchSpy, assert_compiles_for_sm90_without_spills, kernel_module
from modeling_kimi_linear import kernels, launch_resources
from modeling_kimi_linear.moe import KimiExperts, KimiMoEGate, KimiSparseMoeBlock

DEVICE = KERNEL_DEVICE


@pytest.fixture(scope="module")
def mdt():
    """The kernel module, where its kernels can run (GPU, or Triton's interpreter on CPU)."""
    return kernel_module("moe_decode_triton")


def experts_float64(x, ids, weights, gate_up, down) -> torch.Tensor:
    """``sum_j w[t, j] * W_down[e] (silu(W_gate[e] x_t) * W_up[e] x_t)``, token by token, in float64."""
    x, gate_up, down, weights = x.double(), gate_up.double(), down.double(), weights.double()
    inter = down.shape[-1]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            gate, up = gate_up[e, :inter] @ x[t], gate_up[e, inter:] @ x[t]
            out[t] += weights[t, j] * (down[e] @ (gate * torch.sigmoid(gate) * up))
    return out


def routing(num_tokens: int, top_k: int, num_experts: int, pool: int, gen: torch.Generator) -> torch.Tensor:
    """``[N, k]`` distinct experts per token, drawn from the first ``pool`` experts (a small pool makes many
    tokens share experts)."""
    return torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(num_tokens)])


def make_experts(num_experts: int, hidden: int, inter: int, seed: int) -> KimiExperts:
    torch.manual_seed(seed)
    experts = KimiExperts(num_experts, hidden, inter, "silu")
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, hidden**-0.5)
        experts.down_proj.normal_(0.0, inter**-0.5)
    return experts.to(DEVICE)


# (tokens, top-k, experts, hidden, intermediate, pool of experts the tokens choose from)
EXPERT_CASES = [
    (1, 8, 64, 200, 40, 64),  # batch 1 at top-8: 8 groups of one copy
    (1, 2, 16, 48, 24, 16),
    (3, 2, 16, 200, 40, 3),  # every expert chosen by 2-3 tokens
    (3, 8, 64, 64, 160, 64),
    (16, 2, 16, 48, 40, 4),  # 16 tokens over 4 experts: groups of ~8
    (16, 8, 32, 64, 48, 9),  # groups of ~14
    (20, 8, 16, 40, 24, 9),  # groups of ~18: more copies than BLOCK_M, two row blocks
]


@pytest.mark.parametrize("num_tokens,top_k,num_experts,hidden,inter,pool", EXPERT_CASES)
def test_experts_match_float64_and_per_copy(mdt, num_tokens, top_k, num_experts, hidden, inter, pool):
    gen = torch.Generator().manual_seed(num_tokens * 100 + top_k)
    experts = make_experts(num_experts, hidden, inter, seed=num_tokens + top_k)
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE)
    ids = routing(num_tokens, top_k, num_experts, pool, gen).to(DEVICE)
    weights = torch.rand(num_tokens, top_k, generator=gen).to(DEVICE)
    with torch.no_grad():
        got = mdt.experts(x, ids, weights, experts.gate_up_proj, experts.down_proj, "silu")
        exact = experts_float64(x, ids, weights, experts.gate_up_proj, experts.down_proj)
        per_copy = experts.per_copy(x.cpu(), ids.cpu(), weights.cpu()) if DEVICE == "cpu" else None
    assert got.dtype == x.dtype and got.shape == x.shape
    scale = exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2e-6 * scale
    if per_copy is not None:
        assert (got - per_copy).abs().max().item() <= 2e-6 * scale


@pytest.mark.parametrize("weights", ["plain", "int8", "int8-zero"])
@pytest.mark.parametrize("with_shared", [False, True])
def test_one_token_gemv_form_matches_float64(mdt, monkeypatch, weights, with_shared):
    """One token (every group one copy) through the element-wise form (``GEMV_ONE_TOKEN``; both kernels launched
    with it, as a spy sees): plain and int8 weights (zero points too), with and without the shared expert in the
    same launches, small tiles (several K blocks, several column / feature blocks) and the default ones, against
    float64; then fp16 x against the padded dot."""
    monkeypatch.setattr(mdt, "GEMV_ONE_TOKEN", True)
    spies = {name: LaunchSpy(getattr(mdt, name), "GEMV", "BLOCK_M") for name in ("_gate_up", "_down")}
    for name, spy in spies.items():
        monkeypatch.setattr(mdt, name, spy)
    gen = torch.Generator().manual_seed(61 + 2 * with_shared + len(weights))
    num_experts, hidden, inter, top_k = 16, 100, 72, 4
    experts = make_experts(num_experts, hidden, inter, seed=61)
    x = torch.randn(1, hidden, generator=gen).to(DEVICE)
    ids = routing(1, top_k, num_experts, num_experts, gen).to(DEVICE)
    routing_weights = torch.rand(1, top_k, generator=gen).to(DEVICE)
    shared_ws = [torch.randn(1, inter, hidden, generator=gen) * hidden**-0.5 for _ in range(2)]
    shared_ws.append(torch.randn(1, hidden, inter, generator=gen) * inter**-0.5)
    if weights == "plain":
        gate_up, down = experts.gate_up_proj, experts.down_proj
        kwargs, exact_gu, exact_dn = {}, gate_up, down
        shared = mdt.SharedExpert(*(w[0].to(DEVICE) for w in shared_ws))
        shared_exact = [w[0] for w in shared_ws]
    else:
        zero = weights == "int8-zero"
        gu, dn = (int8_per_row(w.detach().cpu(), gen, zero) for w in (experts.gate_up_proj, experts.down_proj))
        gate_up, down = gu[0], dn[0]
        kwargs = dict(gate_up_scale=gu[1], down_scale=dn[1], gate_up_zero=gu[2], down_zero=dn[2])
        exact_gu, exact_dn = dequantized(*gu), dequantized(*dn)
        parts = [int8_per_row(w, gen, zero) for w in shared_ws]
        shared = mdt.SharedExpert(*(q[0] for q, _, _ in parts), scales=tuple(sc[0] for _, sc, _ in parts),
                                  zeros=tuple(z[0] for _, _, z in parts) if zero else None)
        shared_exact = [dequantized(*part)[0] for part in parts]
    exact = experts_float64(x, ids, routing_weights, exact_gu, exact_dn)
    if with_shared:
        exact = exact + shared_float64(x, *shared_exact)
    for stages, tiles in ((1, {}), (3, {"gate_up_tile": {"BLOCK_N": 16, "BLOCK_K": 32},
                                        "down_tile": {"BLOCK_N": 16, "BLOCK_K": 16}})):
        monkeypatch.setattr(mdt, "GEMV_STAGES", stages)  # loads unpipelined, then pipelined 3 deep
        with torch.no_grad():
            got = mdt.experts(x, ids, routing_weights, gate_up, down, "silu", shared=shared if with_shared else None,
                              **kwargs, **tiles)
        assert (got.double() - exact).abs().max().item() <= 2e-6 * exact.abs().max().item()
    monkeypatch.setattr(mdt, "GEMV_STAGES", 1)
    assert all(spy.seen == [(True, 1), (True, 1)] for spy in spies.values())
    if weights == "plain":  # fp16 x and weights (the interpreter's bf16 products are wrong): as the padded dot does
        half = {"x": x.half(), "gate_up": gate_up.detach().half(), "down": down.detach().half()}
        shared_half = mdt.SharedExpert(*(w.half() for w in shared[:3])) if with_shared else None
        outs = []
        for gemv in (True, False):
            monkeypatch.setattr(mdt, "GEMV_ONE_TOKEN", gemv)
            with torch.no_grad():
                outs.append(mdt.experts(half["x"], ids, routing_weights, half["gate_up"], half["down"], "silu",
                                        shared=shared_half))
        assert outs[0].dtype == torch.float16
        assert (outs[0].double() - outs[1].double()).abs().max().item() <= 2e-3 * outs[1].abs().max().item()
        assert all(spy.seen[2:] == [(True, 1), (False, mdt.BLOCK_M)] for spy in spies.values())


def test_experts_small_tiles_loop_over_k(mdt):
    """Tiles smaller than the widths: several K blocks in both GEMVs, several column / feature blocks."""
    gen = torch.Generator().manual_seed(5)
    experts = make_experts(16, 100, 72, seed=5)
    x = torch.randn(5, 100, generator=gen).to(DEVICE)
    ids = routing(5, 4, 16, 6, gen).to(DEVICE)
    weights = torch.rand(5, 4, generator=gen).to(DEVICE)
    with torch.no_grad():
        got = mdt.experts(x, ids, weights, experts.gate_up_proj, experts.down_proj, "silu",
                          gate_up_tile={"BLOCK_N": 16, "BLOCK_K": 32}, down_tile={"BLOCK_N": 16, "BLOCK_K": 16})
        exact = experts_float64(x, ids, weights, experts.gate_up_proj, experts.down_proj)
    assert (got.double() - exact).abs().max().item() <= 2e-6 * exact.abs().max().item()


def test_experts_match_grouped_path(mdt):
    """Against the grouped route of ``KimiExperts.forward`` (more copies than experts: not the per-copy route)."""
    gen = torch.Generator().manual_seed(7)
    experts = make_experts(16, 48, 32, seed=7)
    x = torch.randn(12, 48, generator=gen).to(DEVICE)
    ids = routing(12, 4, 16, 16, gen).to(DEVICE)
    weights = torch.rand(12, 4, generator=gen).to(DEVICE)
    with torch.no_grad():
        got = mdt.experts(x, ids, weights, experts.gate_up_proj, experts.down_proj, "silu")
        experts.decode_kernels = "torch"
        want = experts(x, ids, weights)
    assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item()


def shared_float64(x, gate, up, down) -> torch.Tensor:
    """``W_down (silu(W_gate x_t) * W_up x_t)`` for every token, in float64."""
    x, gate, up, down = x.double(), gate.double(), up.double(), down.double()
    g, u = x @ gate.T, x @ up.T
    return (g * torch.sigmoid(g) * u) @ down.T


@pytest.mark.parametrize("num_tokens,top_k,num_experts,hidden,inter,pool", [EXPERT_CASES[0], EXPERT_CASES[2],
                                                                             EXPERT_CASES[-1]])
def test_shared_expert_in_the_same_launches(mdt, num_tokens, top_k, num_experts, hidden, inter, pool):
    """A shared expert given to the kernels (one more group: every token, weight 1) adds its float64 output; with
    20 tokens its group has two row blocks."""
    gen = torch.Generator().manual_seed(num_tokens * 7 + top_k)
    experts = make_experts(num_experts, hidden, inter, seed=num_tokens + 1)
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE)
    ids = routing(num_tokens, top_k, num_experts, pool, gen).to(DEVICE)
    weights = torch.rand(num_tokens, top_k, generator=gen).to(DEVICE)
    gate, up = (torch.randn(inter, hidden, generator=gen) * hidden**-0.5 for _ in range(2))
    down = torch.randn(hidden, inter, generator=gen) * inter**-0.5
    shared = mdt.SharedExpert(gate.to(DEVICE), up.to(DEVICE), down.to(DEVICE))
    with torch.no_grad():
        got = mdt.experts(x, ids, weights, experts.gate_up_proj, experts.down_proj, "silu", shared=shared)
    exact = experts_float64(x, ids, weights, experts.gate_up_proj, experts.down_proj) + shared_float64(x, *shared[:3])
    assert (got.double() - exact).abs().max().item() <= 2e-6 * exact.abs().max().item()
    with pytest.raises(ValueError, match="shared expert must be contiguous"):
        mdt.experts(x, ids, weights, experts.gate_up_proj, experts.down_proj, "silu",
                    shared=mdt.SharedExpert(gate.T.contiguous().to(DEVICE), up.to(DEVICE), down.to(DEVICE)))


def int8_per_row(w: torch.Tensor, gen: torch.Generator, zero: bool):
    """Per-row int8 data, fp32 scale ``[E, N, 1]`` and (optionally nonzero) int8 zero point: the layout of
    torchao's int8 weight-only tensors, built here from ``w [E, N, K]``."""
    z = torch.randint(-3, 4, (*w.shape[:2], 1), generator=gen, dtype=torch.int8) if zero else None
    scale = w.abs().amax(-1, keepdim=True).float() / 120
    q = (w / scale).round().clamp(-120, 120)
    if z is not None:
        q = q + z.float()
    return q.to(torch.int8).to(DEVICE), scale.to(DEVICE), None if z is None else z.to(DEVICE)


def dequantized(q, scale, z):
    return (q.double() - (0 if z is None else z.double())) * scale.double()


@pytest.mark.parametrize("num_tokens,top_k,num_experts,hidden,inter,pool", EXPERT_CASES[:4] + EXPERT_CASES[-1:])
@pytest.mark.parametrize("zero", [False, True])
def test_int8_experts_match_float64_of_the_dequantized_weights(mdt, num_tokens, top_k, num_experts, hidden, inter,
                                                               pool, zero):
    """Int8 data with per-row scales (and zero points): the kernels read the int8 values and scale the fp32 sums;
    the reference is the float64 sum over ``(q - zero) * scale``."""
    gen = torch.Generator().manual_seed(num_tokens * 10 + top_k)
    experts = make_experts(num_experts, hidden, inter, seed=num_tokens)
    gu, dn = (int8_per_row(w.detach().cpu(), gen, zero) for w in (experts.gate_up_proj, experts.down_proj))
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE)
    ids = routing(num_tokens, top_k, num_experts, pool, gen).to(DEVICE)
    weights = torch.rand(num_tokens, top_k, generator=gen).to(DEVICE)
    assert mdt.experts_supported(x, gu[0], dn[0], "silu")
    with torch.no_grad():
        got = mdt.experts(x, ids, weights, gu[0], dn[0], "silu", gate_up_scale=gu[1], down_scale=dn[1],
                          gate_up_zero=gu[2], down_zero=dn[2])
    exact = experts_float64(x, ids, weights, dequantized(*gu), dequantized(*dn))
    assert (got.double() - exact).abs().max().item() <= 2e-6 * exact.abs().max().item()
    with pytest.raises(ValueError, match="both expert weights"):
        mdt.experts(x, ids, weights, gu[0], dn[0], "silu", gate_up_scale=gu[1])


@pytest.mark.parametrize("zero", [False, True])
def test_int8_shared_expert_in_the_same_launches(mdt, zero):
    """Int8 routed experts with an int8 shared expert (its own row scales and zero points): the float64 sum over the
    dequantized weights of both."""
    gen = torch.Generator().manual_seed(21)
    num_tokens, top_k, num_experts, hidden, inter = 3, 4, 16, 64, 40
    experts = make_experts(num_experts, hidden, inter, seed=21)
    gu, dn = (int8_per_row(w.detach().cpu(), gen, zero) for w in (experts.gate_up_proj, experts.down_proj))
    ws = [torch.randn(1, inter, hidden, generator=gen) * hidden**-0.5 for _ in range(2)]
    ws.append(torch.randn(1, hidden, inter, generator=gen) * inter**-0.5)
    parts = [int8_per_row(w, gen, zero) for w in ws]  # each (q [1, N, K], scale [1, N, 1], zero or None)
    shared = mdt.SharedExpert(*(p[0][0] for p in parts), scales=tuple(p[1][0] for p in parts),
                              zeros=tuple(p[2][0] for p in parts) if zero else None)
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE)
    ids = routing(num_tokens, top_k, num_experts, num_experts, gen).to(DEVICE)
    weights = torch.rand(num_tokens, top_k, generator=gen).to(DEVICE)
    with torch.no_grad():
        got = mdt.experts(x, ids, weights, gu[0], dn[0], "silu", gate_up_scale=gu[1], down_scale=dn[1],
                          gate_up_zero=gu[2], down_zero=dn[2], shared=shared)
    exact = experts_float64(x, ids, weights, dequantized(*gu), dequantized(*dn))
    exact += shared_float64(x, *(dequantized(*p)[0] for p in parts))
    assert (got.double() - exact).abs().max().item() <= 2e-6 * exact.abs().max().item()
    with pytest.raises(ValueError, match="scales"):
        mdt.experts(x, ids, weights, gu[0], dn[0], "silu", gate_up_scale=gu[1], down_scale=dn[1],
                    gate_up_zero=gu[2], down_zero=dn[2], shared=shared._replace(scales=None))


def test_torchao_int8_experts_through_the_seam(mdt, monkeypatch):
    """``KimiExperts`` quantized by torchao (``Int8WeightOnlyConfig``, the layout ``quantized_experts`` reads): with
    the seam choosing Triton (CPU tensors under the interpreter here), a decode step runs the int8 kernels (no
    gather-and-dequantize) and gives what the PyTorch path of the same quantized weights gives."""
    torchao = pytest.importorskip("torchao.quantization")
    from modeling_kimi_linear import quantized_experts
    from modeling_kimi_linear.quantization import int8_rows

    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "resolve_decode_kernels", fake_resolve)
    experts = make_experts(16, 64, 48, seed=11).to(torch.float32)
    torchao.quantize_(experts, torchao.FqnToConfig({"gate_up_proj": torchao.Int8WeightOnlyConfig(),
                                                    "down_proj": torchao.Int8WeightOnlyConfig()}), filter_fn=None)
    assert int8_rows(experts.gate_up_proj)[0].dtype == torch.int8
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 64, generator=gen).to(DEVICE)
    ids = routing(2, 4, 16, 16, gen).to(DEVICE)
    weights = torch.rand(2, 4, generator=gen).to(DEVICE)
    calls = []
    monkeypatch.setattr(kernels, "moe_decode_module", lambda: calls.append(1) or mdt)
    gathered = quantized_experts._gathered
    monkeypatch.setattr(quantized_experts, "_gathered", lambda *a: calls.append("gather") or gathered(*a))
    with torch.no_grad():
        got = experts(x, ids, weights)
        assert calls == [1]
        want = gathered(experts, x, ids, weights)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_torchao_int8_block_takes_its_shared_expert_into_the_launches(mdt, monkeypatch):
    """A whole MoE block quantized by torchao (experts and the shared expert's linears, ``Int8WeightOnlyConfig``):
    with the seam choosing Triton, the shared expert joins the int8 experts' launches (its module is never called)
    and the block gives what its PyTorch path gives on the same quantized weights."""
    torchao = pytest.importorskip("torchao.quantization")
    from modeling_kimi_linear.moe import KimiMLP

    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "resolve_decode_kernels", fake_resolve)
    block = random_block().to(DEVICE)
    config = torchao.Int8WeightOnlyConfig()
    torchao.quantize_(block, torchao.FqnToConfig({"experts.gate_up_proj": config, "experts.down_proj": config}),
                      filter_fn=None)
    torchao.quantize_(block.shared_experts, config)
    calls = []
    mlp_forward = KimiMLP.forward
    monkeypatch.setattr(KimiMLP, "forward", lambda self, t: calls.append("mlp") or mlp_forward(self, t))
    x = torch.randn(1, 3, 48, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        got, _ = block(x)
        assert calls == []
        for module in (block.gate, block.experts, block.shared_experts):
            module.decode_kernels = "torch"
        want, _ = block(x)
    assert calls == ["mlp"]
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_experts_reject_bad_shapes(mdt):
    experts = make_experts(8, 16, 8, seed=0)
    x = torch.randn(2, 16, device=DEVICE)
    ids = torch.zeros(2, 2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"gate_up \[E, 2I, D\]"):
        mdt.experts(x[:, :8], ids, torch.ones(2, 2, device=DEVICE), experts.gate_up_proj, experts.down_proj)
    with pytest.raises(ValueError, match="activation 'gelu'"):
        mdt.experts(x, ids, torch.ones(2, 2, device=DEVICE), experts.gate_up_proj, experts.down_proj, "gelu")


def test_supported_only_where_the_pytorch_path_computes_the_same(mdt):
    """Autocast to another dtype (the PyTorch path would cast), mixed dtypes or an activation the kernels lack send
    a call back to PyTorch."""
    experts = make_experts(8, 16, 8, seed=0)
    x = torch.randn(2, 16, device=DEVICE)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    assert mdt.experts_supported(x, gate_up, down, "silu") and mdt.route_supported(x)
    assert not mdt.experts_supported(x, gate_up, down, "gelu")
    assert not mdt.experts_supported(x.bfloat16(), gate_up, down, "silu")
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        assert not mdt.experts_supported(x, gate_up, down, "silu") and not mdt.route_supported(x)


def gate_config(num_experts, top_k, groups, topk_group, activation, include_bias, hidden=64):
    return SimpleNamespace(
        num_experts_per_token=top_k, num_experts=num_experts, num_expert_group=groups, topk_group=topk_group,
        moe_renormalize=True, routed_scaling_factor=2.446, moe_router_activation_func=activation,
        router_weights_include_bias=include_bias, hidden_size=hidden,
    )


def choice_margin(gate: KimiMoEGate, x: torch.Tensor) -> float:
    """The smallest float64 gap, over tokens, at each decision the router makes (the k-th against the next
    expert, and for grouped routing the topk_group-th against the next group): the test data is separated when
    this is far above fp32 rounding."""
    logits = x.double() @ gate.weight.double().T
    scores = torch.sigmoid(logits) if gate.activation == "sigmoid" else logits.softmax(-1)
    biased = scores + gate.e_score_correction_bias.double()
    choice, gaps = biased, []
    if gate.num_groups > 1:
        grouped = biased.unflatten(-1, (gate.num_groups, -1))
        group_score = grouped.topk(min(2, grouped.shape[-1]), -1).values.sum(-1)
        ranked = group_score.sort(-1, descending=True).values
        gaps.append(ranked[:, gate.topk_group - 1] - ranked[:, gate.topk_group])
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(-1, group_score.topk(gate.topk_group, -1).indices, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), 0.0).flatten(-2)
    ranked = choice.sort(-1, descending=True).values
    gaps.append(ranked[:, gate.top_k - 1] - ranked[:, gate.top_k])
    return min(g.min().item() for g in gaps)


# (experts, top-k, groups, groups kept, activation, weights include the bias, router dtype)
ROUTER_CASES = [
    (64, 8, 1, 1, "sigmoid", True, torch.float32),  # the release's routing at a small width
    (64, 8, 1, 1, "sigmoid", False, torch.float32),
    (64, 8, 8, 3, "sigmoid", True, torch.float32),  # grouped top-k
    (32, 4, 4, 2, "softmax", False, torch.float32),
    (16, 4, 16, 6, "sigmoid", True, torch.float32),  # groups of one expert (group score = its best, no second)
    (32, 2, 1, 1, "sigmoid", True, torch.bfloat16),  # weight read in bf16, converted in registers
]


@pytest.mark.parametrize("num_experts,top_k,groups,topk_group,activation,include_bias,dtype", ROUTER_CASES)
@pytest.mark.parametrize("num_tokens", [1, 3, 16, 20])
def test_router_matches_gate(mdt, num_tokens, num_experts, top_k, groups, topk_group, activation, include_bias,
                             dtype):
    """The logits kernel's last program of each block of tokens selects their experts (20 tokens: blocks of 16 and
    4, each with its own arrival counter, back at 0 after the launch)."""
    torch.manual_seed(num_experts + top_k + groups + num_tokens)
    gate = KimiMoEGate(gate_config(num_experts, top_k, groups, topk_group, activation, include_bias))
    with torch.no_grad():
        gate.weight.normal_(0.0, 0.3)
        gate.e_score_correction_bias.normal_(0.0, 0.2)
    gate = gate.to(dtype)  # as model.to(dtype) leaves it: weight and bias in dtype
    x = torch.randn(num_tokens, 64).to(dtype)
    assert choice_margin(gate, x) > 1e-5, "test data too close to a tie"
    gate, x = gate.to(DEVICE), x.to(DEVICE)
    with torch.no_grad():
        gate.decode_kernels = "torch"
        ids, weights, logits = gate(x)
        got_ids, got_weights, got_logits = mdt.route(
            x, gate.weight, gate.e_score_correction_bias, top_k=top_k, num_groups=groups, topk_group=topk_group,
            renormalize=True, scaling=2.446, activation=activation, weights_include_bias=include_bias,
        )
    assert got_ids.dtype == torch.int64 and got_weights.dtype == torch.float32 and got_logits.dtype == torch.float32
    assert torch.equal(got_ids, ids)  # same experts, in the same (descending) order
    assert torch.allclose(got_weights, weights, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got_logits, logits, rtol=1e-5, atol=1e-5)
    assert not launch_resources._COUNTERS[x.device].any()


def test_router_selects_in_a_second_launch_without_counters(mdt, monkeypatch):
    """Where no arrival counters can be had (a CUDA-graph capture that would allocate them), the selection is a
    launch of its own, with the same result."""
    torch.manual_seed(2)
    gate = KimiMoEGate(gate_config(32, 4, 4, 2, "sigmoid", True)).to(DEVICE)
    x = torch.randn(5, 64).to(DEVICE)
    kwargs = dict(top_k=4, num_groups=4, topk_group=2, renormalize=True, scaling=2.446, activation="sigmoid",
                  weights_include_bias=True)
    with torch.no_grad():
        fused = mdt.route(x, gate.weight, gate.e_score_correction_bias, **kwargs)
        monkeypatch.setattr(mdt, "arrival_counters", lambda device, n: None)
        apart = mdt.route(x, gate.weight, gate.e_score_correction_bias, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(fused, apart))


@pytest.mark.parametrize("num_tokens", [1, 2, 3])
def test_router_at_the_release_width_matches_float64(mdt, num_tokens):
    """The release's router shape (256 experts over 2304 features; decode tiles of 2 experts and K blocks of 1024
    at one or two tokens, so K ends inside a block): logits against float64, experts as the PyTorch gate."""
    torch.manual_seed(num_tokens)
    gate = KimiMoEGate(gate_config(256, 8, 1, 1, "sigmoid", False, hidden=2304))
    with torch.no_grad():
        gate.weight.normal_(0.0, 0.05)
        gate.e_score_correction_bias.normal_(0.0, 0.2)
    x = torch.randn(num_tokens, 2304)
    assert choice_margin(gate, x) > 1e-5, "test data too close to a tie"
    gate, x = gate.to(DEVICE), x.to(DEVICE)
    with torch.no_grad():
        gate.decode_kernels = "torch"
        ids, _, _ = gate(x)
        got_ids, _, got_logits = mdt.route(x, gate.weight, gate.e_score_correction_bias, top_k=8, num_groups=1,
                                           topk_group=1, renormalize=True, scaling=2.446, activation="sigmoid",
                                           weights_include_bias=False)
    want = x.double() @ gate.weight.double().T
    assert float((got_logits.double() - want).abs().max()) < 1e-4
    assert torch.equal(got_ids, ids)


def block_config(**overrides):
    from modeling_kimi_linear import KimiLinearConfig

    kwargs = dict(
        vocab_size=32, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=8,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_experts=32, num_experts_per_token=4,
        moe_intermediate_size=24, linear_attn_config={"kda_layers": [1], "full_attn_layers": [2], "head_dim": 8,
                                                      "num_heads": 2},
    )
    return KimiLinearConfig(**{**kwargs, **overrides})


def random_block(**overrides) -> KimiSparseMoeBlock:
    torch.manual_seed(3)
    block = KimiSparseMoeBlock(block_config(**overrides))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return block


def fake_resolve(choice: str, device: torch.device) -> str:
    """``resolve_decode_kernels`` as on a CUDA machine with triton, whatever the device."""
    return "torch" if choice == "torch" else "triton"


@pytest.mark.parametrize("fused_shared", [True, False])
def test_block_through_the_seam_matches_torch_path(mdt, monkeypatch, fused_shared):
    """The whole MoE block with the seam sending its router and experts to the kernels (on CPU tensors under the
    interpreter: the device check is what is bypassed here) against the PyTorch path of the same block. The shared
    expert joins the experts' launches (its module is never called) unless its own ``decode_kernels`` is
    ``"torch"``."""
    from modeling_kimi_linear.moe import KimiMLP

    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "resolve_decode_kernels", fake_resolve)
    block = random_block().to(DEVICE)
    if not fused_shared:
        block.shared_experts.decode_kernels = "torch"
    x = torch.randn(1, 6, 48, device=DEVICE)
    calls = []
    monkeypatch.setattr(kernels, "moe_decode_module", lambda: calls.append(1) or mdt)
    mlp_forward = KimiMLP.forward
    monkeypatch.setattr(KimiMLP, "forward", lambda self, t: calls.append("mlp") or mlp_forward(self, t))
    with torch.no_grad():
        got, got_logits = block(x)
        assert calls == ([1, 1] if fused_shared else [1, 1, "mlp"]), calls  # router, experts (, shared module)
        block.gate.decode_kernels = block.experts.decode_kernels = block.shared_experts.decode_kernels = "torch"
        want, logits = block(x)
    assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item()
    assert torch.allclose(got_logits, logits, rtol=1e-5, atol=1e-5)


class _FakeKernels:
    """Stands in for the Triton module: records what the seam sent it, returns the PyTorch result."""

    def __init__(self, block: KimiSparseMoeBlock) -> None:
        self.block, self.calls = block, []

    def experts_supported(self, x, gate_up, down, activation) -> bool:  # noqa: ANN001
        return True

    def route_supported(self, x) -> bool:  # noqa: ANN001
        return True

    def experts(self, x, ids, weights, gate_up, down, activation, shared=None):  # noqa: ANN001
        assert shared is None, "the fake computes no shared expert"
        self.calls.append(("experts", ids.numel(), activation))
        return self.block.experts.per_copy(x, ids, weights)

    def route(self, x, weight, bias, **kwargs):  # noqa: ANN001
        self.calls.append(("route", x.shape[0], kwargs["top_k"]))
        return _torch_route(self.block.gate, x)


def _torch_route(gate: KimiMoEGate, x: torch.Tensor):
    choice = gate.decode_kernels
    gate.decode_kernels = "torch"
    try:
        return gate(x)
    finally:
        gate.decode_kernels = choice


def test_cpu_tensors_never_reach_triton(monkeypatch):
    """With triton importable, ``decode_kernels="auto"`` keeps CPU tensors on the PyTorch path (the kernel module
    is never imported), and ``"triton"`` on CPU tensors is the documented clear error."""

    def boom():
        raise AssertionError("the Triton MoE module was requested for CPU tensors")

    monkeypatch.setattr(kernels, "triton_imports", lambda: True)
    monkeypatch.setattr(kernels, "moe_decode_module", boom)
    block = random_block().eval()
    assert block.gate.decode_kernels == block.experts.decode_kernels == "auto"
    with torch.no_grad():
        for tokens in (1, 3):
            out, _ = block(torch.randn(1, tokens, 48))
            assert torch.isfinite(out).all()
    block = random_block(decode_kernels="triton")
    with torch.no_grad(), pytest.raises(RuntimeError, match="decode_kernels='triton' needs CUDA"):
        block(torch.randn(1, 2, 48))


def test_seam_sends_only_decode_calls_without_autograd(monkeypatch):
    """Where Triton is resolved (faked here), the router and the experts go to the kernels for a decode-sized
    call without autograd, and stay on PyTorch with autograd, past MOE_DECODE_MAX_COPIES, for a quantized weight
    subclass, or with ``decode_kernels="torch"``."""
    block = random_block(num_experts_per_token=4)
    block.shared_experts.decode_kernels = "torch"  # its launch is tests/test_multi_linear_triton.py's
    fake = _FakeKernels(block)
    monkeypatch.setattr(kernels, "resolve_decode_kernels", fake_resolve)
    monkeypatch.setattr(kernels, "moe_decode_module", lambda: fake)
    x = torch.randn(1, 3, 48)
    with torch.no_grad():
        want, _ = random_block(num_experts_per_token=4, decode_kernels="torch")(x)
        got, _ = block(x)
    assert fake.calls == [("route", 3, 4), ("experts", 12, "silu")]
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    fake.calls.clear()
    block(x)  # autograd on: the PyTorch path
    with torch.no_grad():
        many = kernels.MOE_DECODE_MAX_COPIES // 4 + 1
        block(torch.randn(1, many, 48))
        block.gate.decode_kernels = block.experts.decode_kernels = "torch"
        block(x)
    assert fake.calls == []

    class Quantized(torch.Tensor):
        pass

    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    with torch.no_grad():
        assert kernels.moe_decode_kernels("auto", x, 12, gate_up, down) is fake
        assert kernels.moe_decode_kernels("auto", x, 12, gate_up.detach().as_subclass(Quantized), down) is None
        assert kernels.moe_decode_kernels("auto", x, 12, gate_up.to(torch.int8), down) is None


def test_checkpoints_carry_the_kernel_module_without_requiring_triton():
    """``save_pretrained`` copies the modules that transformers' relative-import scan finds: the kernel module must
    be among them (a remote-code model on a GPU imports it), and loading must not require triton."""
    from pathlib import Path

    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    package = Path(kernels.__file__).parent
    copied = {Path(p).name for p in get_relative_import_files(str(package / "modeling_kimi_linear.py"))}
    assert "moe_decode_triton.py" in copied
    assert "triton" not in get_imports(str(package / "moe_decode_triton.py"))


COMPILE_SETUP = r"""
from modeling_kimi_linear import moe_decode_triton as m
kernel, quant, zero = sys.argv[1], sys.argv[2] == "int8", sys.argv[3] == "zero"
shared, direct = sys.argv[4].startswith("shared"), sys.argv[4].endswith("direct")
gemv, piped = sys.argv[5:6] in (["gemv"], ["gemv3"]), sys.argv[5:6] == ["gemv3"]
fn = getattr(m, kernel)
names = fn.arg_names
tile = m.GATE_UP_TILE if kernel == "_gate_up" else m.DOWN_TILE
const = {"D": 2304, "I": 1024, "QUANT": quant, "HAS_ZERO": zero, "BLOCK_M": 1 if gemv else m.BLOCK_M,
         "BLOCK_N": tile["BLOCK_N"], "BLOCK_K": tile["BLOCK_K"], "PRECISION": "tf32", "stride_wk": 1, "SHARED": shared,
         "DIRECT": direct, "GEMV": gemv, "LOOP_STAGES": (3 if piped else m.GEMV_STAGES) if gemv else tile["num_stages"]}
weight, scale = "*i8" if quant else "*bf16", "*fp32" if quant else "*bf16"
zero = "*i8" if zero else scale
types = {"w_ptr": weight, "scale_ptr": scale, "zero_ptr": zero, "groups_ptr": "*i32", "order_ptr": "*i32",
         "weights_ptr": "*fp32", "ys_ptr": "*fp32", "ids_ptr": "*i64", "sw_gate_ptr": weight, "sw_up_ptr": weight, "sw_ptr": weight,
         "s_scale_gate_ptr": scale, "s_scale_up_ptr": scale, "s_scale_ptr": scale, "s_zero_gate_ptr": zero,
         "s_zero_up_ptr": zero, "s_zero_ptr": zero}
signature = {n: "constexpr" if n in const else types.get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in names}
# as Triton specialises them at run time: pointers and the strides (multiples of 16 at the release's widths)
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
         if n.endswith("_ptr") or (n.startswith("stride") and n not in const)}
options = {"num_warps": tile["num_warps"], "num_stages": tile["num_stages"]}
"""


@pytest.mark.parametrize("kernel", ["_gate_up", "_down"])
@pytest.mark.parametrize("weights", ["bf16", "int8-nozero", "int8-zero"])
@pytest.mark.parametrize("shared", ["shared", "shared-direct", "routed"])
def test_expert_kernels_compile_for_sm90_without_spills(tmp_path, kernel, weights, shared):
    """The expert GEMV kernels at the release's widths, bf16 and int8 weights (with and without zero points), with
    and without a shared expert, grouped or (one token) direct, compile for sm_90 (the interpreter runs Python, not
    the compiler) and stay in registers. The strides are marked multiples of 16, as Triton's run-time
    specialisation marks them; without that, ``_gate_up``'s loads were not pipelined and it kept a few hundred
    bytes on the stack, which earlier versions of this test took for the kernel's own."""
    quant = "int8" if weights.startswith("int8") else "bf16"
    assert_compiles_for_sm90_without_spills(tmp_path, COMPILE_SETUP, kernel, quant,
                                            "zero" if weights.endswith("-zero") else "none", shared)


@pytest.mark.parametrize("kernel", ["_gate_up", "_down"])
@pytest.mark.parametrize("weights", ["bf16", "int8-nozero", "int8-zero"])
@pytest.mark.parametrize("shared", ["shared-direct", "routed-direct", "shared-direct-piped"])
def test_one_token_expert_kernels_compile_for_sm90_without_spills(tmp_path, kernel, weights, shared):
    """The one-token element-wise form (``GEMV_ONE_TOKEN``) of both expert kernels, with and without the shared
    expert, bf16 and int8 weights, its loads unpipelined and pipelined 3 deep: compiles for sm_90 and stays in
    registers."""
    quant = "int8" if weights.startswith("int8") else "bf16"
    piped = shared.endswith("-piped")
    assert_compiles_for_sm90_without_spills(tmp_path, COMPILE_SETUP, kernel, quant,
                                            "zero" if weights.endswith("-zero") else "none",
                                            shared.removesuffix("-piped"), "gemv3" if piped else "gemv")


ROUTER_COMPILE_SETUP = r"""
from modeling_kimi_linear import moe_decode_triton as m
fn = m._router_logits
names = fn.arg_names
# the release's router at one token: 256 experts over 2304 features, 2 experts a program, K blocks of 1024
const = {"D": 2304, "BLOCK_M": 1, "BLOCK_E": m.ROUTER_DECODE_BLOCK_E, "BLOCK_D": m.ROUTER_DECODE_BLOCK_D,
         "LINES": 64, "SELECT": sys.argv[1] == "select", "EP": 256, "TOP_K": 8, "KP": 8, "NUM_GROUPS": 1, "NGP": 1,
         "TOPK_GROUP": 1, "GROUP_SIZE": 256, "SOFTMAX": False, "INCLUDE_BIAS": True, "RENORMALIZE": True}
types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", "bias_ptr": "*fp32", "ids_ptr": "*i64",
         "weights_ptr": "*fp32", "cnt_ptr": "*i32", "scaling": "fp32"}
signature = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in types if n.endswith("_ptr")}
options = {"num_warps": 4}
"""


@pytest.mark.parametrize("select", ["select", "logits-only"])
def test_router_kernel_compiles_for_sm90_without_spills(tmp_path, select):
    """The router's logits kernel at the release's shape, with the selection in its last program and without,
    compiles for sm_90 (the interpreter runs Python, not the compiler), stays in registers, and with programmatic
    dependent launch waits before its first memory access (only the weight prefetch comes before)."""
    assert_compiles_for_sm90_without_spills(tmp_path, ROUTER_COMPILE_SETUP, select)
