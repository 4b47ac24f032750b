"""Tests of the pure-PyTorch KDA kernels against an independent float64 step-by-step recurrence (numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeling_kimi_linear.kda_torch import kda_chunk_torch, kda_recurrent_torch, l2norm

TOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# independent reference: the KDA recurrence written out per (sequence, head, token) in float64 numpy


def reference_kda(q, k, v, g, beta, *, scale=None, initial_state=None, use_qk_l2norm=True, cu_seqlens=None):
    """Returns (o [B, T, H, V], final states [N, H, K, V]) as float64 numpy arrays."""
    q, k, v, g, beta = (x.detach().to(torch.float64).numpy() for x in (q, k, v, g, beta))
    bsz, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    if cu_seqlens is None:
        runs = [(b, 0, seqlen) for b in range(bsz)]  # (batch row, start, end); state index = run index
    else:
        bounds = [int(x) for x in cu_seqlens]
        runs = [(0, a, e) for a, e in zip(bounds[:-1], bounds[1:])]
    h0 = None if initial_state is None else initial_state.detach().to(torch.float64).numpy()
    out = np.zeros((bsz, seqlen, heads, dv))
    finals = np.zeros((len(runs), heads, dk, dv))
    for n, (b, start, end) in enumerate(runs):
        for h in range(heads):
            state = np.zeros((dk, dv)) if h0 is None else h0[n, h].copy()
            for t in range(start, end):
                qt, kt = q[b, t, h], k[b, t, h]
                if use_qk_l2norm:
                    qt = qt / np.sqrt(np.dot(qt, qt) + 1e-6)
                    kt = kt / np.sqrt(np.dot(kt, kt) + 1e-6)
                qt = qt * scale
                state = np.exp(g[b, t, h])[:, None] * state
                err = v[b, t, h] - state.T @ kt
                state = state + beta[b, t, h] * np.outer(kt, err)
                out[b, t, h] = state.T @ qt
            finals[n, h] = state
    return out, finals


def rel_err(actual: torch.Tensor, expected) -> float:
    """max |actual - expected| / max |expected| (scale-free, insensitive to single tiny reference entries)."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    diff = (actual.detach().to(torch.float64) - expected).abs().max().item()
    return diff / max(expected.abs().max().item(), 1e-30)


def make_inputs(bsz, seqlen, heads, dk, dv, *, seed=0, with_state=False, n_states=None, dtype=torch.float32,
                gate=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, seqlen, heads, dk, generator=gen)
    k = torch.randn(bsz, seqlen, heads, dk, generator=gen)
    v = torch.randn(bsz, seqlen, heads, dv, generator=gen)
    if gate is None:
        g = F.logsigmoid(torch.randn(bsz, seqlen, heads, dk, generator=gen) + 2.0)  # mostly mild decay
    else:
        g = gate(gen, (bsz, seqlen, heads, dk))
    beta = torch.sigmoid(torch.randn(bsz, seqlen, heads, generator=gen))
    h0 = None
    if with_state:
        h0 = torch.randn(n_states or bsz, heads, dk, dv, generator=gen)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    return q, k, v, g, beta, h0


def check_against_reference(fn, inputs, tol=TOL, **kwargs):
    q, k, v, g, beta, h0 = inputs
    o, state = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kwargs)
    kwargs.pop("chunk_size", None)
    ref_o, ref_state = reference_kda(q, k, v, g, beta, initial_state=h0, **kwargs)
    assert torch.isfinite(o).all() and torch.isfinite(state).all(), "non-finite output or state"
    assert o.shape == ref_o.shape and o.dtype == v.dtype
    assert state.shape == ref_state.shape and state.dtype == torch.float32
    e_o, e_s = rel_err(o, ref_o), rel_err(state, ref_state)
    assert e_o < tol, f"output: max abs error / max abs reference = {e_o:.2e} >= {tol}"
    assert e_s < tol, f"final state: max abs error / max abs reference = {e_s:.2e} >= {tol}"


# ----------------------------------------------------------------------------------------------------------------


def test_l2norm_eps_inside_sqrt_and_float32():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.bfloat16)
    y = l2norm(x, eps=1e-6)
    assert y.dtype == torch.float32
    expected = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64) / np.sqrt(25.0 + 1e-6)
    assert torch.allclose(y.double(), expected, rtol=1e-6, atol=0)
    assert l2norm(torch.ones(2, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("seqlen", [1, 37, 64, 130, 200])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dims", [(16, 16), (32, 24)])
def test_matches_reference(seqlen, with_state, dims):
    dk, dv = dims
    inputs = make_inputs(2, seqlen, 2, dk, dv, seed=seqlen + 7 * dk, with_state=with_state)
    q, k, v, g, beta, h0 = inputs
    ref_o, ref_state = reference_kda(q, k, v, g, beta, initial_state=h0)
    for name, fn in (("chunk", kda_chunk_torch), ("recurrent", kda_recurrent_torch)):
        o, state = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        assert o.dtype == torch.float32 and state.dtype == torch.float32
        e_o, e_s = rel_err(o, ref_o), rel_err(state, ref_state)
        assert e_o < TOL, f"{name} output: max abs error / max abs reference = {e_o:.2e}"
        assert e_s < TOL, f"{name} final state: max abs error / max abs reference = {e_s:.2e}"


@pytest.mark.parametrize("chunk_size", [4, 5, 16, 32, 48, 128])
def test_other_chunk_sizes(chunk_size):
    """Leaf-only, odd, one-level, two-level and three-level splits of the intra-chunk Gram matrices."""
    inputs = make_inputs(1, 150, 2, 16, 8, seed=chunk_size, with_state=True)
    check_against_reference(kda_chunk_torch, inputs, chunk_size=chunk_size)


def strong_channels(gen, shape):
    """Half the key channels decay by e^-20 .. e^-60 per token, the others barely decay."""
    strong = -20.0 - 40.0 * torch.rand(shape, generator=gen)
    weak = -0.05 * torch.rand(shape, generator=gen)
    return torch.where(torch.arange(shape[-1]) % 2 == 0, strong, weak)


def strong_mixed(gen, shape):
    """Each (token, channel) is either strong (-20 .. -60) or nearly 1 (-0 .. -0.02): G inside a chunk jumps to
    -1000s and then stays flat, which overflows exp(G_i) exp(-G_j) and punishes differences of cumulative sums."""
    strong = -20.0 - 40.0 * torch.rand(shape, generator=gen)
    weak = -0.02 * torch.rand(shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < 0.15, strong, weak)


@pytest.mark.parametrize("gate", [strong_channels, strong_mixed])
@pytest.mark.parametrize("fn", [kda_chunk_torch, kda_recurrent_torch])
def test_strong_gates(gate, fn):
    inputs = make_inputs(2, 150, 2, 16, 16, seed=3, with_state=True, gate=gate)
    assert inputs[3].min() < -50 and inputs[3].max() > -0.05
    check_against_reference(fn, inputs)


def test_strong_gates_backward_finite_and_consistent():
    """Gradients through the chunked form stay finite with strong gates and agree with the token loop."""
    inputs = make_inputs(1, 70, 2, 8, 8, seed=5, with_state=True, gate=strong_mixed)
    grads = []
    for fn in (kda_chunk_torch, kda_recurrent_torch):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        o, s = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        (o.square().sum() + s.square().sum()).backward()
        grads.append([x.grad for x in leaves])
    for name, a, b in zip("q k v g beta h0".split(), *grads):
        assert torch.isfinite(a).all(), f"non-finite gradient for {name}"
        err = rel_err(a, b)
        assert err < 1e-4, f"grad {name}: max abs difference / max abs (recurrent) = {err:.2e}"


@pytest.mark.parametrize("fn", [kda_chunk_torch, kda_recurrent_torch])
def test_no_l2norm_and_custom_scale(fn):
    q, k, v, g, beta, h0 = make_inputs(2, 100, 2, 16, 12, seed=11, with_state=True)
    k = 0.8 * k / 16**0.5  # |k| ~ 0.8 keeps the unnormalised delta rule contractive
    check_against_reference(fn, (q, k, v, g, beta, h0), use_qk_l2norm=False, scale=0.37)
    check_against_reference(fn, (q, k, v, g, beta, h0), scale=1.3)


@pytest.mark.parametrize("fn", [kda_chunk_torch, kda_recurrent_torch])
def test_cu_seqlens_packed_equals_separate(fn):
    lengths = [37, 64, 99]
    cu = torch.tensor([0, 37, 101, 200], dtype=torch.int32)
    q, k, v, g, beta, h0 = make_inputs(1, sum(lengths), 2, 16, 8, seed=21, with_state=True, n_states=3)
    o, state = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (1, 200, 2, 8) and state.shape == (3, 2, 16, 8)
    ref_o, ref_state = reference_kda(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu)
    assert rel_err(o, ref_o) < TOL, f"packed output vs reference: {rel_err(o, ref_o):.2e}"
    assert rel_err(state, ref_state) < TOL, f"packed states vs reference: {rel_err(state, ref_state):.2e}"
    for n in range(3):
        a, b = int(cu[n]), int(cu[n + 1])
        o_n, s_n = fn(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], initial_state=h0[n : n + 1],
                      output_final_state=True)
        assert torch.allclose(o[:, a:b], o_n, rtol=1e-5, atol=1e-6), f"sequence {n}: packed != separate output"
        assert torch.allclose(state[n : n + 1], s_n, rtol=1e-5, atol=1e-6), f"sequence {n}: packed != separate state"


@pytest.mark.parametrize("fn", [kda_chunk_torch, kda_recurrent_torch])
def test_cu_seqlens_equal_lengths_and_empty(fn):
    """Equal lengths (the batched decode path: one token per sequence) and an empty sequence (state unchanged)."""
    q, k, v, g, beta, h0 = make_inputs(1, 4, 2, 8, 8, seed=2, with_state=True, n_states=4)
    cu = torch.arange(5)
    o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    ref_o, ref_s = reference_kda(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu)
    assert rel_err(o, ref_o) < TOL and rel_err(s, ref_s) < TOL, "one token per sequence differs from reference"
    cu = torch.tensor([0, 3, 3, 4])
    o, s = fn(q, k, v, g, beta, initial_state=h0[:3], output_final_state=True, cu_seqlens=cu)
    ref_o, ref_s = reference_kda(q, k, v, g, beta, initial_state=h0[:3], cu_seqlens=cu)
    assert torch.equal(s[1], h0[1]), "an empty sequence must return its initial state"
    assert rel_err(o, ref_o) < TOL and rel_err(s, ref_s) < TOL, "empty sequence case differs from reference"


def test_cu_seqlens_requires_batch_one():
    q, k, v, g, beta, _ = make_inputs(2, 8, 1, 4, 4)
    with pytest.raises(ValueError):
        kda_chunk_torch(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 8]))


def _grad_inputs(seqlen, seed):
    gen = torch.Generator().manual_seed(seed)
    kw = dict(dtype=torch.float64)
    q = torch.randn(1, seqlen, 1, 3, generator=gen, **kw)
    k = torch.randn(1, seqlen, 1, 3, generator=gen, **kw)
    v = torch.randn(1, seqlen, 1, 3, generator=gen, **kw)
    g = F.logsigmoid(torch.randn(1, seqlen, 1, 3, generator=gen, **kw) + 1.0)
    beta = torch.sigmoid(torch.randn(1, seqlen, 1, generator=gen, **kw))
    h0 = torch.randn(1, 1, 3, 3, generator=gen, **kw)
    return [x.requires_grad_(True) for x in (q, k, v, g, beta, h0)]


@pytest.mark.parametrize("seqlen, chunk_size, fast", [(5, 4, False), (9, 4, False), (7, 8, False), (19, 16, True)])
def test_gradcheck_chunk(seqlen, chunk_size, fast):
    """Several chunks and a partial last chunk; chunk_size 4 / 8 / 16 take one / two / three levels of the
    intra-chunk split. The largest case uses gradcheck's fast mode (random projections) to keep the file quick."""

    def fn(q, k, v, g, beta, h0):
        return kda_chunk_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size)

    inputs = _grad_inputs(seqlen, seqlen)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)


@pytest.mark.parametrize("fn", [kda_chunk_torch, kda_recurrent_torch])
def test_gradcheck_cu_seqlens(fn):
    """Gradients through packed sequences, each with its own initial state (chunk_size 4 for the chunked form)."""
    q, k, v, g, beta, _ = _grad_inputs(9, 3)
    h0 = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 6, 9])
    extra = {"chunk_size": 4} if fn is kda_chunk_torch else {}

    def run(q, k, v, g, beta, h0):
        return fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu, **extra)

    assert torch.autograd.gradcheck(run, (q, k, v, g, beta, h0), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_recurrent():
    def fn(q, k, v, g, beta, h0):
        return kda_recurrent_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(fn, _grad_inputs(6, 1), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_float64_mode_matches_reference_tightly():
    q, k, v, g, beta, h0 = (x.double() for x in make_inputs(1, 100, 2, 8, 8, seed=4, with_state=True))
    o, s = kda_chunk_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=16)
    assert o.dtype == torch.float64 and s.dtype == torch.float64
    ref_o, ref_s = reference_kda(q, k, v, g, beta, initial_state=h0)
    assert rel_err(o, ref_o) < 1e-12 and rel_err(s, ref_s) < 1e-12, "float64 mode should be exact to rounding"


@pytest.mark.parametrize("fn", [kda_chunk_torch, kda_recurrent_torch])
def test_bf16_inputs(fn):
    q, k, v, g, beta, h0 = make_inputs(2, 90, 2, 16, 16, seed=9, with_state=True, dtype=torch.bfloat16)
    o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o32, s32 = fn(q.float(), k.float(), v.float(), g, beta.float(), initial_state=h0, output_final_state=True)
    assert rel_err(o, o32) < 1e-2, f"bf16 output vs fp32 compute on the same inputs: {rel_err(o, o32):.2e}"
    assert rel_err(s, s32) < 1e-5, "the state is computed in fp32 either way"
