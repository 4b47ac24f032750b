"""The MLA flash-decoding Triton kernel under Triton's CPU interpreter, float32, against a float64 softmax
reference and against the PyTorch latent path of ``KimiMLAAttention.attend_latent``.

Skipped where triton is not installed (the default test environment). Run it with::

    TRITON_INTERPRET=1 /work/venv-triton/bin/python -m pytest -q tests/test_mla_decode_triton.py

(the module sets ``TRITON_INTERPRET=1`` itself before triton is imported). Float32 only: the interpreter's
``tl.dot`` is wrong on bf16; bf16 is checked on the GPU by ``bench/gpu_check.py --only mla``.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from modeling_kimi_linear import KimiLinearConfig, kernels  # noqa: E402
from modeling_kimi_linear import mla_decode_triton as mdt  # noqa: E402
from modeling_kimi_linear.mla_layer import KimiMLAAttention  # noqa: E402

H, DV, DR = 32, 512, 64  # the release's shape: 32 heads, 512 latent values + 64 key-only values per row
L = DV + DR


pytestmark = pytest.mark.usefixtures("interpreter_loops_with_numpy_2_4")


def reference64(q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None, scale: float, dv: int):
    """Softmax attention in float64, written out: ``[B, H, L]``, ``[B, S, L]``, ``[B or 1, S]`` -> ``[B, H, dv]``."""
    scores = torch.einsum("bhl,bsl->bhs", q.double(), latent.double()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("bhs,bsv->bhv", scores.softmax(-1), latent[..., :dv].double())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def leading_padding(bsz: int, rows: int, pads: list[int]) -> torch.Tensor:
    """``[B, S]`` bool mask, False on the first ``pads[b]`` rows of sequence ``b``."""
    return torch.arange(rows)[None, :] >= torch.tensor(pads)[:, None]


def latent_view(gen: torch.Generator, bsz: int, rows: int, spare: int = 0) -> torch.Tensor:
    """``[B, rows, L]``: the first ``rows`` of a buffer of ``rows + spare`` rows (a batch stride, as in decode)."""
    buf = torch.randn(bsz, rows + spare, L, generator=gen)
    return buf[:, :rows]


# (batch, rows, forced splits or None for the host's plan, padding per sequence or None for no mask, spare rows)
CASES = [
    (1, 5, None, None, 0),  # fewer rows than one tile
    (2, 64, 1, [0, 17], 0),  # a whole number of tiles, one split
    (3, 100, 3, [0, 40, 99], 28),  # a partial last tile, several splits, a buffer view; the last row sees 1 row
    (1, 300, None, [70], 0),  # the host's plan (several splits)
    (2, 37, 4, [5, 0], 11),  # more requested splits than tiles: clipped to whole tiles
]


@pytest.mark.parametrize("bsz,rows,splits,pads,spare", CASES)
def test_kernel_matches_float64(bsz, rows, splits, pads, spare):
    gen = torch.Generator().manual_seed(1000 + rows)
    q = torch.randn(bsz, H, L, generator=gen) * 0.3
    latent = latent_view(gen, bsz, rows, spare)
    mask = leading_padding(bsz, rows, pads) if pads is not None else None
    scale = (128 + 64) ** -0.5
    out = mdt.mla_decode_attention(q, latent, mask, scale, DV, num_splits=splits)
    assert out.shape == (bsz, H, DV) and out.dtype == latent.dtype
    assert rel(out, reference64(q, latent, mask, scale, DV)) < 1e-5


@pytest.mark.parametrize("config", mdt.CONFIGS + (mdt.FP32_CONFIG,), ids=str)
def test_every_config_matches_float64(config):
    """Each launch configuration the GPU check times computes the same thing (heads or rows as the dots' M)."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, H, L, generator=gen) * 0.3
    latent = latent_view(gen, 2, 150, spare=10)
    mask = leading_padding(2, 150, [0, 60])
    out = mdt.mla_decode_attention(q, latent, mask, 0.07, DV, config=config, num_splits=2)
    assert rel(out, reference64(q, latent, mask, 0.07, DV)) < 1e-5


def test_mask_of_one_row_broadcasts_and_a_fully_masked_sequence_gives_zero():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, H, L, generator=gen)
    latent = latent_view(gen, 2, 90)
    shared = leading_padding(1, 90, [30])  # [1, S]: one mask for the whole batch
    out = mdt.mla_decode_attention(q, latent, shared, 0.05, DV, num_splits=3)
    assert rel(out, reference64(q, latent, shared.expand(2, -1), 0.05, DV)) < 1e-5
    none_left = leading_padding(2, 90, [0, 90])  # the second sequence sees nothing: defined as 0, not NaN
    out = mdt.mla_decode_attention(q, latent, none_left, 0.05, DV, num_splits=3)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel(out[:1], reference64(q[:1], latent[:1], none_left[:1], 0.05, DV)) < 1e-5


def test_split_plan_spreads_the_tiles_over_the_sms():
    for rows in (1, 31, 32, 4096, 131072, 1 << 20):
        for bsz in (1, 4):
            splits = mdt.split_plan(rows, bsz, 132, 64)
            assert 1 <= splits <= mdt.MAX_SPLITS
            assert splits == 1 or -(-rows // 64) >= splits * mdt.MIN_TILES_PER_SPLIT - mdt.MIN_TILES_PER_SPLIT
    assert mdt.split_plan(1 << 20, 1, 132, 64) == mdt.SPLITS_PER_SM * 132  # a long context: every SM busy


def test_row_limit_skips_rows_past_it():
    """A static decode step attends over a bucket of rows of which only ``position + 1`` are filled: with
    ``row_limit`` the kernel never reads the rest (poisoned with NaN here) and equals attention over the filled
    rows; every split keeps a share of the rows that remain."""
    torch.manual_seed(11)
    q = torch.randn(2, H, L)
    latent = torch.randn(2, 300, L)
    latent[:, 170:] = float("nan")
    mask = leading_padding(2, 300, [0, 25])
    limit = torch.tensor([170])
    for splits in (1, 3, 7):
        out = mdt.mla_decode_attention(q, latent, mask, 0.05, DV, num_splits=splits, row_limit=limit)
        want = reference64(q, latent[:, :170], mask[:, :170], 0.05, DV)
        assert torch.isfinite(out).all()
        assert rel(out, want) < 1e-5
    with pytest.raises(ValueError, match="row_limit"):
        mdt.mla_decode_attention(q, latent, mask, 0.05, DV, row_limit=torch.tensor([1.5]))


def test_query_in_two_parts_with_any_head_strides_matches_one_tensor():
    """The value-space part and the shared-key part of the query given apart (as the layer passes them: the first
    a head-major product, the second a slice of the projection) give what the concatenated query gives."""
    gen = torch.Generator().manual_seed(5)
    q, latent = torch.randn(3, H, L, generator=gen), torch.randn(3, 40, L, generator=gen)
    head_major = q[..., :DV].transpose(0, 1).contiguous().transpose(0, 1)  # strides (DV, B * DV, 1)
    wider = torch.randn(3, H, L + 8, generator=gen)
    wider[..., 8:] = q
    rope = wider[..., 8 + DV:]  # a slice with the batch and head strides of a wider tensor
    want = mdt.mla_decode_attention(q, latent, None, 0.05, DV, num_splits=3)
    got = mdt.mla_decode_attention(head_major, latent, None, 0.05, DV, num_splits=3, q_rope=rope)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="q_rope"):
        mdt.mla_decode_attention(head_major, latent, None, 0.05, DV, q_rope=rope[:2])


def test_bad_input_is_one_clear_error():
    q, latent = torch.randn(1, H, L), torch.randn(1, 8, L)
    with pytest.raises(ValueError, match="mask must be bool"):
        mdt.mla_decode_attention(q, latent, torch.ones(1, 8), 0.1, DV)
    with pytest.raises(ValueError, match="does not match"):
        mdt.mla_decode_attention(q, torch.randn(1, 8, L + 1), None, 0.1, DV)
    with pytest.raises(ValueError, match="value_dim"):
        mdt.mla_decode_attention(q, latent, None, 0.1, L)


def _layer(**dims) -> KimiMLAAttention:
    cfg = KimiLinearConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, layer_types=["full_attention"],
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, **dims)
    torch.manual_seed(5)
    return KimiMLAAttention(cfg, 0).eval()


@pytest.mark.parametrize("dims", [{}, dict(num_attention_heads=4, kv_lora_rank=24, qk_rope_head_dim=8,
                                             qk_nope_head_dim=16, v_head_dim=16)], ids=["release", "odd-sizes"])
def test_attend_latent_through_the_kernel_matches_the_pytorch_path(monkeypatch, dims):
    """The layer's decode path with the seam forced to "triton" (the interpreter stands in for a GPU) against its
    own PyTorch path, with a CUDA-graph-style mask: a bucket of a preallocated buffer, rows past the position
    zero and masked, one sequence left-padded. Prompts (T > 1) stay on PyTorch."""
    layer = _layer(**dims)
    monkeypatch.setattr(kernels, "resolve_decode_kernels", lambda choice, device: "torch" if choice == "torch"
                        else "triton")
    calls = []
    real = kernels.mla_decode
    monkeypatch.setattr(kernels, "mla_decode", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    gen = torch.Generator().manual_seed(11)
    bsz, bucket, capacity, position = 2, 96, 130, 80
    buf = torch.zeros(bsz, capacity, layer.kv_lora_rank + layer.rope_dim)
    buf[:, : position + 1] = torch.randn(bsz, position + 1, buf.shape[-1], generator=gen)
    keys_valid = torch.ones(bsz, capacity, dtype=torch.bool)
    keys_valid[1, :23] = False
    mask = (keys_valid[:, :bucket] & (torch.arange(bucket) <= position))[:, None, None, :]
    q = torch.randn(bsz, layer.num_heads, 1, layer.q_dim, generator=gen)
    with torch.no_grad():
        layer.decode_kernels = "torch"
        want = layer.attend_latent(q, buf[:, :bucket], mask)
        layer.decode_kernels = "auto"
        got = layer.attend_latent(q, buf[:, :bucket], mask)
        assert calls == [(bsz, bucket, buf.shape[-1])]
        assert got.shape == want.shape and rel(got, want) < 1e-5
        q2 = torch.randn(bsz, layer.num_heads, 2, layer.q_dim, generator=gen)
        mask2 = mask.expand(-1, -1, 2, -1)
        layer.attend_latent(q2, buf[:, :bucket], mask2)
        assert len(calls) == 1, "two new tokens must stay on the PyTorch path"
        no_mask = layer.attend_latent(q, buf[:, : position + 1], None)
        layer.decode_kernels = "torch"
        assert rel(no_mask, layer.attend_latent(q, buf[:, : position + 1], None)) < 1e-5


MLA_COMPILE_SETUP = r"""
import torch
from modeling_kimi_linear import mla_decode_triton as m
fn = getattr(m, sys.argv[1])
names = fn.arg_names
config = m.default_config(torch.bfloat16)
if sys.argv[1] == "_mla_decode_split_kernel":  # the release's latent rows (512 + 64) and 32 heads
    const = {"DV": 512, "DR": 64, "BLOCK_H": 32, "BLOCK_DV": 512, "BLOCK_DR": 64, "BLOCK_S": config.block_s,
             "HAS_MASK": True, "HAS_LIMIT": True, "KV_MAJOR": config.kv_major, "PRECISION": "tf32"}
    types = {"q_ptr": "*bf16", "qr_ptr": "*bf16", "kv_ptr": "*bf16", "mask_ptr": "*u8", "limit_ptr": "*i64", "part_ptr": "*fp32",
             "lse_ptr": "*fp32", "qk_scale": "fp32", "stride_kb": "i64"}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
else:
    const = {"DV": 512, "BLOCK_C": m.COMBINE_BLOCK, "SPLIT_CHUNK": m.COMBINE_SPLITS}
    types = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"}
    options = {"num_warps": 4}
signature = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr")}
"""


@pytest.mark.parametrize("kernel", ["_mla_decode_split_kernel", "_mla_decode_combine_kernel"])
def test_kernels_compile_for_sm90_with_dependent_launch(tmp_path, kernel):
    """Both kernels compile for an H100 / H200 (sm_90, no GPU needed) as a Hopper launch uses them: with
    programmatic dependent launch, waiting for the previous kernel before their first memory access
    (:mod:`modeling_kimi_linear.pdl`; the conftest helper checks the PTX's order), and stay in registers."""
    from conftest import assert_compiles_for_sm90_without_spills

    assert_compiles_for_sm90_without_spills(tmp_path, MLA_COMPILE_SETUP, kernel)
