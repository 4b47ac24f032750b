"""The fused KDA decode-step kernel (:mod:`kda_decode_triton`) under Triton's CPU interpreter, float32 tensors.

Checked against (a) the layer's PyTorch path (short_conv_torch + kda_recurrent_torch + gated_rms_normalize) on the
same weights, through ``KimiDeltaAttention.forward`` and its cache, and (b) a float64 step-by-step recurrence written
here from the math. Several steps in a row (state carried), batches of 1 to 3, masked tokens, strided conv tails,
in-place updates, per-channel and per-head forget gates.

Needs triton and ``TRITON_INTERPRET=1`` set before triton is imported (done below when this module is the first to
import it); in the main environment (no triton) it skips::

    TRITON_INTERPRET=1 /work/venv-triton/bin/python -m pytest -q tests/test_kda_decode_triton.py
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import: kernels are then interpreted

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # set to something else by the caller
    pytest.skip("TRITON_INTERPRET=1 is needed to run Triton kernels on the CPU", allow_module_level=True)

from conftest import assert_compiles_for_sm90_without_spills  # noqa: E402
from modeling_kimi_linear import KimiLinearCache, kda_decode_triton, kda_layer, kernels, launch_resources  # noqa: E402
from modeling_kimi_linear.kda_decode_triton import kda_decode_step  # noqa: E402
from modeling_kimi_linear.kda_layer import KimiDeltaAttention  # noqa: E402
from modeling_kimi_linear.presets import load_preset  # noqa: E402

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------ float64 reference


def sigmoid64(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def reference_step(params: dict, inputs: dict, tail: torch.Tensor, state: torch.Tensor, keep: list[bool]):
    """One decode step in float64, sequence by sequence and head by head, from the math (not from the package).

    ``tail [B, 3P, W-1]`` oldest first, ``state [B, H, D, D]``; returns ``(out [B, P], new tail, new state)``."""
    heads, dim, eps = params["heads"], params["dim"], params["eps"]
    proj = heads * dim
    bsz = tail.shape[0]
    weight = torch.cat([params["wq"], params["wk"], params["wv"]]).reshape(3 * proj, -1).to(F64)  # [3P, W]
    out = torch.zeros(bsz, proj, dtype=F64)
    new_tail = torch.zeros_like(tail, dtype=F64)
    new_state = state.to(F64).clone()
    for b in range(bsz):
        raw = torch.cat([inputs["q"][b], inputs["k"][b], inputs["v"][b]]).to(F64)  # [3P]
        if not keep[b]:
            raw = torch.zeros_like(raw)
        window = torch.cat([tail[b].to(F64), raw[:, None]], 1)  # [3P, W]
        new_tail[b] = window[:, 1:]
        conv = (window * weight).sum(1)
        act = conv * sigmoid64(conv)
        for h in range(heads):
            cols = slice(h * dim, (h + 1) * dim)
            q, k, v = act[cols], act[proj:][cols], act[2 * proj:][cols]
            q = q / torch.sqrt((q * q).sum() + 1e-6) / math.sqrt(dim)
            k = k / torch.sqrt((k * k).sum() + 1e-6)
            f = inputs["f"][b].to(F64)
            dt = params["dt_bias"].to(F64)
            if params["per_head"]:
                z = f[h] + dt[h]
            else:
                z = f[cols] + dt[cols]
            g = -math.exp(float(params["A_log"].reshape(-1)[h])) * torch.log1p(torch.exp(z))
            beta = sigmoid64(inputs["b"][b][h].to(F64))
            if not keep[b]:
                g, beta = g * 0, beta * 0
            s = torch.exp(g).reshape(-1, 1) * new_state[b, h]  # decayed state (rows: key channels)
            s = s + beta * torch.outer(k, v - s.T @ k)  # delta rule on the decayed state
            new_state[b, h] = s
            o = s.T @ q
            o = o / torch.sqrt((o * o).mean() + eps)
            out[b, cols] = o * params["norm_w"].to(F64) * sigmoid64(inputs["gate"][b][cols].to(F64))
    return out, new_tail, new_state


def random_params(heads: int, dim: int, width: int, per_head: bool, gen: torch.Generator) -> dict:
    proj = heads * dim
    return {
        "heads": heads, "dim": dim, "eps": 1e-5, "per_head": per_head,
        "wq": torch.randn(proj, 1, width, generator=gen) * 0.6,
        "wk": torch.randn(proj, 1, width, generator=gen) * 0.6,
        "wv": torch.randn(proj, 1, width, generator=gen) * 0.6,
        "A_log": torch.rand(1, 1, heads, 1, generator=gen) * 2 - 1,
        "dt_bias": torch.randn(heads if per_head else proj, generator=gen),
        "norm_w": 1 + 0.3 * torch.randn(dim, generator=gen),
    }


def random_inputs(bsz: int, heads: int, dim: int, per_head: bool, gen: torch.Generator) -> dict:
    proj = heads * dim
    return {
        "q": torch.randn(bsz, 1, proj, generator=gen), "k": torch.randn(bsz, 1, proj, generator=gen),
        "v": torch.randn(bsz, 1, proj, generator=gen),
        "f": torch.randn(bsz, 1, heads if per_head else proj, generator=gen) * 2,
        "b": torch.randn(bsz, 1, heads, generator=gen) * 2, "gate": torch.randn(bsz, 1, proj, generator=gen) * 2,
    }


def call_kernel(params: dict, inputs: dict, tail: torch.Tensor, state: torch.Tensor, mask, in_place: bool,
                split_v: int | None = None):
    return kda_decode_step(
        inputs["q"], inputs["k"], inputs["v"], inputs["f"], inputs["b"], inputs["gate"],
        (params["wq"], params["wk"], params["wv"]), params["A_log"], params["dt_bias"], params["norm_w"],
        params["eps"], tail, state, mask, in_place=in_place, split_v=split_v,
    )


@pytest.mark.parametrize("split_v", [None, 1, 2, 8])
@pytest.mark.parametrize("bsz,heads,dim,per_head", [(1, 2, 32, False), (2, 3, 16, False), (3, 2, 16, True)])
def test_kernel_matches_float64_recurrence_over_steps(bsz, heads, dim, per_head, split_v):
    """Six steps in a row from a random state and tail; a masked token at step 2 (sequence 0) and step 4 (the
    last sequence); the tail a strided view of a wider window (as an eager cache holds it) on odd steps; in place
    on steps 3 and 5. Each head's value columns in one program, or split over 2 or 8 (the last to arrive norms the
    head and puts its arrival counter back to 0, so the next step starts from zero counters), or as
    :func:`split_plan` chooses."""
    width = 4
    gen = torch.Generator().manual_seed(bsz * 100 + heads)
    params = random_params(heads, dim, width, per_head, gen)
    proj = heads * dim
    tail = torch.randn(bsz, 3 * proj, width - 1, generator=gen)
    state = torch.randn(bsz, heads, dim, dim, generator=gen) * 0.3
    ref_tail, ref_state = tail.to(F64), state.to(F64)
    for step in range(6):
        inputs = random_inputs(bsz, heads, dim, per_head, gen)
        keep = [True] * bsz
        if step == 2:
            keep[0] = False
        if step == 4:
            keep[-1] = False
        mask = torch.tensor(keep).reshape(bsz, 1) if step in (2, 3, 4) else None  # also an all-True mask
        if step % 2:  # strided: the newest W-1 columns of a [B, 3P, W] window
            window = torch.randn(bsz, 3 * proj, width, generator=gen)
            window[:, :, 1:] = tail
            tail = window[:, :, 1:]
            assert not tail.is_contiguous()
        in_place = step in (3, 5)
        before = (tail.data_ptr(), state.data_ptr())
        out, tail, state = call_kernel(params, inputs, tail, state, mask, in_place, split_v)
        assert not launch_resources._COUNTERS.get(out.device, torch.zeros(1)).any()
        if in_place:
            assert (tail.data_ptr(), state.data_ptr()) == before
        expected, ref_tail, ref_state = reference_step(
            params, {n: x[:, 0] for n, x in inputs.items()}, ref_tail, ref_state, keep)
        assert out.shape == (bsz, 1, proj) and out.dtype == torch.float32
        assert rel(out[:, 0], expected) < 2e-5, step
        assert rel(state, ref_state) < 2e-5, step
        assert rel(tail, ref_tail) == 0.0, step  # pure data movement


def test_masked_token_leaves_state_unchanged_and_shifts_a_zero_into_the_tail():
    """What the PyTorch path does for a padded decode token: state kept exactly, the tail shifted with a zero."""
    gen = torch.Generator().manual_seed(7)
    params = random_params(2, 16, 4, False, gen)
    tail = torch.randn(2, 96, 3, generator=gen)
    state = torch.randn(2, 2, 16, 16, generator=gen)
    inputs = random_inputs(2, 2, 16, False, gen)
    _, new_tail, new_state = call_kernel(params, inputs, tail, state, torch.tensor([[False], [True]]), False)
    assert torch.equal(new_state[0], state[0])
    assert not torch.equal(new_state[1], state[1])
    assert torch.equal(new_tail[0, :, :2], tail[0, :, 1:]) and torch.equal(new_tail[0, :, 2], torch.zeros(96))


def test_split_plan_fills_the_sms_at_small_batches_only():
    """Allowed up to 8 programs a head, the release's 32 heads at batch 1 on a 132-SM GPU: 8 programs a head (256);
    batch 4: 2 (256); from batch 5 (160 heads) one program a head; never under 16 value columns a program; by
    default one program a head (the split did not pay on an H100); a bad split is refused."""
    plan = kda_decode_triton.split_plan
    assert [plan(32 * b, 128, 132, most=8) for b in (1, 2, 4, 5, 64)] == [8, 4, 2, 1, 1]
    assert plan(2, 32, 132, most=8) == 2  # 16 columns a program at least
    assert plan(32, 128, 132, most=64) == 8  # never past MAX_SPLIT_V
    assert [plan(32 * b, 128, 132) for b in (1, 4)] == [kda_decode_triton.PLANNED_MAX_SPLIT_V] * 2 == [1, 1]
    gen = torch.Generator().manual_seed(1)
    params = random_params(2, 16, 4, False, gen)
    with pytest.raises(ValueError, match="split_v"):
        call_kernel(params, random_inputs(1, 2, 16, False, gen), torch.zeros(1, 96, 3), torch.zeros(1, 2, 16, 16),
                    None, False, split_v=3)


# ------------------------------------------------------------------------------------------------ through the layer


def randomise(layer: KimiDeltaAttention, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "A_log":
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 1)
            elif name == "o_norm.weight":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "conv1d" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
            elif name == "dt_bias":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


# float16 checks the kernel's roundings to the model dtype (conv outputs, o, the normed output) against the
# reference's; bfloat16 cannot be checked here: the interpreter truncates float32 -> bfloat16 where the GPU rounds
# to nearest even (the lead's bench/gpu_check.py --only kdastep checks bf16 on the GPU)
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-4)}  # output, state


@pytest.mark.parametrize("granularity,bsz,dtype", [("channel", 1, torch.float32), ("channel", 3, torch.float32),
                                                   ("head", 1, torch.float32), ("head", 3, torch.float32),
                                                   ("channel", 2, torch.float16), ("head", 2, torch.float16)])
def test_layer_decode_matches_pytorch_path(monkeypatch, granularity, bsz, dtype):
    """``KimiDeltaAttention.forward`` with the fused step (forced on for CPU tensors here) against the same layer on
    the PyTorch path: a prefill, one PyTorch decode step (which leaves a strided tail in the cache), then fused
    steps, eager and as a static graph step (in place), a padded token among them; outputs and cached tail and
    state compared every step."""
    config = load_preset("tiny", kda_backend="torch", kda_gate_granularity=granularity)
    gen = torch.Generator().manual_seed(bsz)
    ref = KimiDeltaAttention(config, 0).eval()
    randomise(ref, gen)
    ref.to(dtype)
    fused = KimiDeltaAttention(config, 0).to(dtype).eval()
    fused.load_state_dict(ref.state_dict())
    ref.decode_kernels, fused.decode_kernels = "torch", "triton"
    use_fused, launches = [False], []

    def fused_kda_decode(decode_kernels, kda_backend, device):  # the seam's answer, for CPU tensors
        return decode_kernels == "triton" and use_fused[0]

    def counted_step(*args, **kwargs):
        launches.append(kwargs["in_place"])
        return kda_decode_step(*args, **kwargs)

    monkeypatch.setattr(kda_layer, "fused_kda_decode", fused_kda_decode)
    monkeypatch.setattr(kda_layer, "kda_decode_step", counted_step)
    # the projections stay module calls here (their one-launch form is tests/test_multi_linear_triton.py's)
    monkeypatch.setattr(kda_layer, "linears", lambda choice, pairs, **kw: kernels.linears("torch", pairs, **kw))
    cache_ref, cache_fused = KimiLinearCache(config), KimiLinearCache(config)
    hidden = config.hidden_size
    out_tol, state_tol = TOLERANCE[dtype]
    with torch.no_grad():
        x = torch.randn(bsz, 5, hidden, generator=gen).to(dtype)
        assert torch.equal(fused(x, cache=cache_fused), ref(x, cache=cache_ref))
        for step in range(6):
            use_fused[0] = step > 0
            x = torch.randn(bsz, 1, hidden, generator=gen).to(dtype)
            mask = None
            if step == 3:
                mask = torch.ones(bsz, 1, dtype=torch.bool)
                mask[-1] = False
            cache_fused.graph_step = object() if step >= 4 else None  # a static step: tensors updated in place
            stored = [t.data_ptr() for t in cache_fused.kda_state(0)]
            a = fused(x, token_mask=mask, cache=cache_fused)
            if step >= 4:
                assert [t.data_ptr() for t in cache_fused.kda_state(0)] == stored
            cache_fused.graph_step = None
            b = ref(x, token_mask=mask, cache=cache_ref)
            assert a.dtype == dtype and rel(a, b) < out_tol, step
            (conv_a, state_a), (conv_b, state_b) = cache_fused.kda_state(0), cache_ref.kda_state(0)
            assert state_a.dtype == torch.float32 and rel(state_a, state_b) < state_tol, step
            assert torch.equal(conv_a, conv_b), step
    assert launches == [False] * 3 + [True] * 2


def test_layer_takes_pytorch_path_when_gradients_are_needed(monkeypatch):
    """Training-time single-token steps keep autograd: the fused kernel is not even asked for."""
    config = load_preset("tiny", kda_backend="torch")
    layer = KimiDeltaAttention(config, 0)

    def boom(*args, **kwargs):
        raise AssertionError("the fused decode kernel ran under autograd")

    monkeypatch.setattr(kda_layer, "fused_kda_decode", lambda *a: True)
    monkeypatch.setattr(kda_layer, "kda_decode_step", boom)
    cache = KimiLinearCache(config)
    layer(torch.randn(1, 3, config.hidden_size), cache=cache)
    out = layer(torch.randn(1, 1, config.hidden_size), cache=cache)
    assert out.requires_grad


COMPILE_SETUP = r"""
from modeling_kimi_linear import kda_decode_triton as m
fn, names = m._kda_decode_kernel, m._kda_decode_kernel.arg_names
model_ptrs = ("q_ptr", "k_ptr", "v_ptr", "f_ptr", "b_ptr", "gate_ptr", "wq_ptr", "wk_ptr", "wv_ptr", "norm_w_ptr",
              "tail_ptr", "tail_out_ptr", "out_ptr")
types = {**{n: "*bf16" for n in model_ptrs}, "a_log_ptr": "*fp32", "dt_bias_ptr": "*fp32", "state_ptr": "*fp32",
         "state_out_ptr": "*fp32", "mask_ptr": "*i1", "scale": "fp32", "eps": "fp32", "o_ws_ptr": "*fp32",
         "cnt_ptr": "*i32"}
# the release's shapes, contiguous tensors: unit strides and 16-divisible ints are what the JIT specialises on
const = {"D": 128, "W": 4, "WP": 4, "HAS_MASK": True, "PER_HEAD_GATE": sys.argv[1] == "head", "stride_sv": 1,
         "stride_zv": 1, "stride_tw": 1, "stride_ow": 1, "SPLIT_V": int(sys.argv[2])}
odd = {"stride_tc", "stride_oc", "stride_mb"}
signature = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in const and n not in odd
         and n not in ("scale", "eps")}
options = {"num_warps": m.DEFAULT_NUM_WARPS}
"""


@pytest.mark.parametrize("split_v", [1, 8])
@pytest.mark.parametrize("gate", ["channel", "head"])
def test_kernel_compiles_for_sm90_without_spills(tmp_path, gate, split_v):
    """The interpreter runs Python, not the compiler: compile the kernel for an H100 / H200 (sm_90, no GPU needed)
    at the release's shapes and default warps, and check that ptxas keeps it in registers (no local-memory
    spills)."""
    assert_compiles_for_sm90_without_spills(tmp_path, COMPILE_SETUP, gate, str(split_v))
