"""Several linear maps in one Triton launch (modeling_kimi_linear/multi_linear_triton.py) and the seam that sends
decode-step projections there (``kernels.linears``).

The kernel runs on CPU tensors under Triton's interpreter (float32: the interpreter's ``tl.dot`` on bf16 is wrong)
or on a GPU; without triton, or without either, those tests skip::

    TRITON_INTERPRET=1 /work/venv-triton/bin/python -m pytest -q tests/test_multi_linear_triton.py

The reference is a float64 product written here. The seam tests run anywhere: CPU tensors never reach the kernel,
and a layer whose projections go through the kernel computes what its module calls compute.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from conftest import KERNEL_DEVICE, LaunchSpy, assert_compiles_for_sm90_without_spills, kernel_module
from modeling_kimi_linear import KimiLinearCache, kernels, launch_resources
from modeling_kimi_linear.kda_layer import KimiDeltaAttention
from modeling_kimi_linear.mla_layer import KimiMLAAttention
from modeling_kimi_linear.moe import KimiMLP
from modeling_kimi_linear.presets import load_preset

DEVICE = KERNEL_DEVICE


@pytest.fixture(scope="module")
def mlt(request):
    """The kernel module, where its kernel can run (GPU, or Triton's interpreter on CPU)."""
    module = kernel_module("multi_linear_triton")
    request.getfixturevalue("interpreter_loops_with_numpy_2_4")
    return module


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def pairs_of(gen: torch.Generator, lead: tuple[int, ...], dims: list[tuple[int, int]]):
    """(x, W) pairs: one x per distinct K (shared by the pairs of that K, as a layer's projections share x)."""
    xs = {k: torch.randn(*lead, k, generator=gen) for k in {k for _, k in dims}}
    return [(xs[k].to(DEVICE), torch.randn(n, k, generator=gen).to(DEVICE)) for n, k in dims]


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 1), (17,)])
@pytest.mark.parametrize("dims", [
    [(96, 64)],
    [(40, 64), (7, 64), (33, 136), (128, 64), (1, 64), (65, 200)],  # odd N and K, a 1-row weight
    [(64, 128), (64, 128)],
])
def test_matches_float64(mlt, lead, dims):
    """Every output against ``x W^T`` in float64: token counts across the 16-row block, N and K off the tiles."""
    gen = torch.Generator().manual_seed(len(dims) * 100 + sum(lead))
    pairs = pairs_of(gen, lead, dims)
    outs = mlt.multi_linear(pairs)
    assert len(outs) == len(pairs)
    for (x, w), y in zip(pairs, outs):
        assert y.shape == (*lead, w.shape[0]) and y.dtype == x.dtype
        assert rel(y, x.double() @ w.double().T) < 1e-6


@pytest.mark.parametrize("zero", [False, True])
def test_int8_weights_match_float64_of_the_dequantized_weights(mlt, zero):
    """Int8 weights with per-row fp32 scales (and int8 zero points): the kernel reads one byte a weight and scales
    each row's fp32 sum; the reference is the float64 product with ``(q - zero) * scale``."""
    gen = torch.Generator().manual_seed(11 + zero)
    dims = [(40, 64), (7, 64), (33, 136)]
    xs = {k: torch.randn(3, k, generator=gen).to(DEVICE) for k in (64, 136)}
    qs = [torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE) for n, k in dims]
    scales = [(torch.rand(n, 1, generator=gen) * 0.01).to(DEVICE) for n, _ in dims]
    zeros = [torch.randint(-3, 4, (n, 1), generator=gen, dtype=torch.int8).to(DEVICE) for n, _ in dims] if zero \
        else None
    outs = mlt.multi_linear([(xs[k], q) for (_, k), q in zip(dims, qs)], scales=scales, zeros=zeros)
    for i, ((_, k), q, y) in enumerate(zip(dims, qs, outs)):
        w = (q.double() - (zeros[i].double() if zero else 0)) * scales[i].double()
        assert y.dtype == xs[k].dtype and rel(y, xs[k].double() @ w.T) < 1e-6
    with pytest.raises(ValueError, match="scales"):
        mlt.multi_linear([(xs[64], qs[0])], scales=scales)
    with pytest.raises(ValueError, match="W be torch.int8"):
        mlt.multi_linear([(xs[64], qs[0].float())], scales=scales[:1])


def test_small_tiles_loop_over_k_and_strided_x(mlt):
    """Tiles smaller than the shapes (several K blocks, several programs per weight) and an x that is a strided
    view (a slice of a wider tensor, rows not contiguous) give the same products."""
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(5, 300, generator=gen).to(DEVICE)
    x = wide[:, 10:210]
    w1, w2 = (torch.randn(n, 200, generator=gen).to(DEVICE) for n in (50, 70))
    tile = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 2, "num_stages": 2}
    for y, w in zip(mlt.multi_linear([(x, w1), (x, w2)], tile=tile), (w1, w2)):
        assert rel(y, x.double() @ w.double().T) < 1e-6


@pytest.mark.parametrize("split", [2, 3, 4])
@pytest.mark.parametrize("quant", [False, True])
def test_split_over_k_matches_float64_and_leaves_the_counters_at_zero(mlt, split, quant):
    """K split in ``split`` ranges (uneven: K = 5 blocks of 32 and a tail), several programs per weight, 17 tokens
    (two row blocks), plain and int8 weights: the products against float64, twice in a row (the last program of
    each tile resets its arrival counter, so a second launch sums its own parts only)."""
    gen = torch.Generator().manual_seed(40 + split + 10 * quant)
    dims = [(40, 176), (7, 176)]
    x = torch.randn(17, 176, generator=gen).to(DEVICE)
    tile = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 2, "num_stages": 2, "SPLIT": split}
    if quant:
        ws = [torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE) for n, k in dims]
        scales = [(torch.rand(n, generator=gen) * 0.01).to(DEVICE) for n, _ in dims]
        want = [x.double() @ (w.double() * s.double()[:, None]).T for w, s in zip(ws, scales)]
        kwargs = {"scales": scales}
    else:
        ws = [torch.randn(n, k, generator=gen).to(DEVICE) for n, k in dims]
        want = [x.double() @ w.double().T for w in ws]
        kwargs = {}
    for _ in range(2):
        outs = mlt.multi_linear([(x, w) for w in ws], tile=tile, **kwargs)
        for y, ref in zip(outs, want):
            assert rel(y, ref) < 1e-6
        assert not launch_resources._COUNTERS[x.device].any()


@pytest.mark.parametrize("quant", ["plain", "int8", "int8-zero"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_token_gemv_form_matches_float64(mlt, monkeypatch, quant, split, dtype):
    """The element-wise form for one token (``GEMV``: no padded ``tl.dot``), as launched (a spy sees GEMV with
    one-row blocks): several weights, odd N and K, K in several blocks, over K in one range or split in three;
    fp32 and fp16 x (the interpreter's bf16 products are wrong); chosen by the tile's key and by
    ``GEMV_ONE_TOKEN``."""
    gen = torch.Generator().manual_seed(70 + split + len(quant))
    dims = [(40, 176), (7, 176), (33, 176)]
    x = torch.randn(1, 176, generator=gen).to(DEVICE, dtype)
    tile = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 2, "num_stages": 2, "SPLIT": split}
    kwargs, ws = {}, []
    if quant == "plain":
        ws = [torch.randn(n, k, generator=gen).to(DEVICE, dtype) for n, k in dims]
        want = [x.double() @ w.double().T for w in ws]
    else:
        ws = [torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE) for n, k in dims]
        scales = [(torch.rand(n, generator=gen) * 0.01).to(DEVICE) for n, _ in dims]
        zeros = [torch.randint(-3, 4, (n,), generator=gen, dtype=torch.int8).to(DEVICE) for n, _ in dims]
        kwargs = {"scales": scales, **({"zeros": zeros} if quant == "int8-zero" else {})}
        shift = zeros if quant == "int8-zero" else [torch.zeros(n, device=DEVICE) for n, _ in dims]
        want = [x.double() @ ((w.double() - z.double()[:, None]) * s.double()[:, None]).T
                for w, s, z in zip(ws, scales, shift)]
    spy = LaunchSpy(mlt._multi_linear, "GEMV", "BLOCK_M")
    monkeypatch.setattr(mlt, "_multi_linear", spy)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3  # fp16 output rounding
    for form in ({**tile, "GEMV": True, "GEMV_STAGES": 3}, tile):  # loads pipelined 3 deep; then the default 1
        monkeypatch.setattr(mlt, "GEMV_ONE_TOKEN", True)  # the second form: chosen by the default, not the tile
        for y, ref in zip(mlt.multi_linear([(x, w) for w in ws], tile=form, **kwargs), want):
            assert y.shape == ref.shape and y.dtype == dtype and rel(y, ref) < tolerance
        counters = launch_resources._COUNTERS.get(x.device)
        assert counters is None or not counters.any()
    assert spy.seen == [(True, 1), (True, 1)]
    mlt.multi_linear([(x, w) for w in ws], tile={**tile, "GEMV": False}, **kwargs)
    mlt.multi_linear([(x.expand(2, -1), w) for w in ws], tile=tile, **kwargs)  # two tokens: never GEMV
    assert spy.seen[2:] == [(False, mlt.BLOCK_M), (False, mlt.BLOCK_M)]


def test_tile_narrows_only_where_sms_would_idle(mlt):
    """KDA's six projections (12576 rows: 197 tiles of 64) keep the measured 64-row tile; a single o_proj or
    down_proj (2304 rows: 36 tiles) narrows to 16 rows (144 programs on 132 SMs); a given BLOCK_N is kept."""
    cpu = torch.device("cpu")  # stands for a 132-SM device
    assert mlt.choose_tile([4096, 4096, 4096, 128, 32, 128], False, cpu)["BLOCK_N"] == 64
    assert mlt.choose_tile([2304], True, cpu) == {**mlt.INT8_TILE, "BLOCK_N": 16, "SPLIT": 1}  # K unknown
    split = mlt.choose_tile([2304], True, cpu, k=4096)  # o_proj: 144 programs, 576 with the split
    assert (split["SPLIT"], split["num_warps"], split["BLOCK_N"]) == (4, 4, 16)
    assert mlt.choose_tile([2304], False, cpu, k=4096, given={"num_warps": 8})["num_warps"] == 8
    assert mlt.choose_tile([2304], True, cpu, k=1024)["SPLIT"] == 1  # too short a K to split
    assert mlt.choose_tile([1024, 1024], False, cpu, k=4096)["SPLIT"] == 1  # a group: not split (measured slower)
    assert mlt.choose_tile([6144, 576], True, cpu, k=2304)["SPLIT"] == 1  # 32-row tiles: no split
    assert mlt.choose_tile([6144, 576], True, cpu)["BLOCK_N"] == 32  # MLA's q / kv_a: 105 tiles of 64, 210 of 32
    assert mlt.choose_tile([2304], False, cpu, {"BLOCK_N": 64})["BLOCK_N"] == 64


def test_rejects_bad_input(mlt):
    x, w = torch.randn(2, 8).to(DEVICE), torch.randn(4, 8).to(DEVICE)
    with pytest.raises(ValueError, match="1 to 6"):
        mlt.multi_linear([])
    with pytest.raises(ValueError, match="1 to 6"):
        mlt.multi_linear([(x, w)] * 7)
    with pytest.raises(ValueError, match="pair 1"):
        mlt.multi_linear([(x, w), (torch.randn(3, 8).to(DEVICE), w)])
    with pytest.raises(ValueError, match="pair 1"):
        mlt.multi_linear([(x, w), (x, torch.randn(4, 9).to(DEVICE))])
    with pytest.raises(ValueError, match="pair 0"):
        mlt.multi_linear([(x, w.double())])


def _force_triton(monkeypatch):
    """Let the seam choose Triton for CPU tensors (the interpreter runs them)."""
    real = kernels.resolve_decode_kernels
    monkeypatch.setattr(kernels, "resolve_decode_kernels",
                        lambda choice, device: "triton" if choice == "triton" else real(choice, device))


def _counting(monkeypatch, mlt) -> list[int]:
    calls = []
    real = mlt.multi_linear

    def counted(pairs, **kwargs):
        calls.append(len(pairs))
        return real(pairs, **kwargs)

    monkeypatch.setattr(mlt, "multi_linear", counted)
    return calls


def test_layers_through_the_seam_match_module_calls(mlt, monkeypatch):
    """A KDA layer, an MLA layer and an MLP with ``decode_kernels="triton"``: decode steps (a prefill before them,
    batch 2, one padded token) give what the same modules give through their own calls, and the launches are the
    expected ones (KDA: 6 + 2 pairs a step; MLA: its 2 projections from x; the MLP: gate and up, down a module
    call); a prompt of
    more tokens than ``MULTI_LINEAR_MAX_TOKENS`` keeps the module calls."""
    _force_triton(monkeypatch)
    calls = _counting(monkeypatch, mlt)
    config = load_preset("tiny", kda_backend="torch")
    gen = torch.Generator().manual_seed(3)
    for layer_cls, idx in ((KimiDeltaAttention, 0), (KimiMLAAttention, 3)):
        ref = layer_cls(config, idx).eval()
        for p in ref.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.2
        fast = layer_cls(config, idx).eval()
        fast.load_state_dict(ref.state_dict())
        ref.decode_kernels, fast.decode_kernels = "torch", "triton"
        cache_ref, cache_fast = KimiLinearCache(config), KimiLinearCache(config)
        calls.clear()
        with torch.no_grad():
            x = torch.randn(2, 40, config.hidden_size, generator=gen)  # 80 tokens: past MULTI_LINEAR_MAX_TOKENS
            # (not bit-equal: MLA's latent norm is the RMSNorm kernel here, whose fp32 sum runs in another order)
            assert rel(fast(x, cache=cache_fast), ref(x, cache=cache_ref)) < 1e-6
            assert calls == []
            for step in range(3):
                x = torch.randn(2, 1, config.hidden_size, generator=gen)
                kwargs = {}
                if step == 1 and layer_cls is KimiDeltaAttention:
                    kwargs["token_mask"] = torch.tensor([[True], [False]])
                assert rel(fast(x, cache=cache_fast, **kwargs), ref(x, cache=cache_ref, **kwargs)) < 1e-5, step
        assert calls == ([6, 2] if layer_cls is KimiDeltaAttention else [2]) * 3
    ref = KimiMLP(config.hidden_size, 48, decode_kernels="torch")
    fast = KimiMLP(config.hidden_size, 48, decode_kernels="triton")
    fast.load_state_dict(ref.state_dict())
    calls.clear()
    with torch.no_grad():
        x = torch.randn(4, config.hidden_size, generator=gen)
        assert rel(fast(x), ref(x)) < 1e-5
    assert calls == [2]  # gate and up in one launch; down alone keeps cuBLAS (faster for one projection)


def test_seam_launches_plain_and_int8_weights_apart(mlt, monkeypatch):
    """Projections of one input where torchao's ``Int8WeightOnlyConfig`` quantized some (as the release's default
    keeps ``f_a_proj`` / ``b_proj`` in high precision beside quantized q/k/v), one wrapped in a subclass and one
    quantized with activations too: one launch for the plain weights, one for the weight-only int8 ones (the
    kernel reads the int8 data), module calls for the rest; every output as the module computes it."""
    torchao = pytest.importorskip("torchao.quantization")
    _force_triton(monkeypatch)
    calls = _counting(monkeypatch, mlt)
    torch.manual_seed(0)

    class Sub(nn.Linear):
        pass

    mods = [nn.Linear(64, n, bias=False) for n in (48, 40, 16)] + [Sub(64, 8, bias=False), nn.Linear(64, 24, False),
                                                                    nn.Linear(64, 32, bias=False)]
    torchao.quantize_(mods[0], torchao.Int8WeightOnlyConfig())
    torchao.quantize_(mods[1], torchao.Int8WeightOnlyConfig())
    torchao.quantize_(mods[5], torchao.Int8DynamicActivationInt8WeightConfig())
    x = torch.randn(2, 64)
    pairs = [(x, m) for m in mods]
    assert [kernels.linear_kind(x, m) for m in mods] == ["int8", "int8", "plain", None, "plain", None]
    with torch.no_grad():
        got = kernels.linears("triton", pairs)
        want = [m(x) for m in mods]
    assert sorted(calls) == [2, 2]
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel(a, b) < (2e-2 if i == 5 else 1e-5), i  # the activation-quantized one: module call either way
        if i == 5:
            assert torch.equal(a, b)


def test_int8_layers_read_int8_through_the_seam(mlt, monkeypatch):
    """An MLA layer and an MLP whose projections torchao's ``Int8WeightOnlyConfig`` quantized: their decode steps
    launch the int8 kernel (MLA: q + kv_a, then o_proj; MLP: gate + up, then down) and compute what the quantized
    modules compute."""
    torchao = pytest.importorskip("torchao.quantization")
    _force_triton(monkeypatch)
    calls = _counting(monkeypatch, mlt)
    config = load_preset("tiny", kda_backend="torch")
    gen = torch.Generator().manual_seed(5)
    ref = KimiMLAAttention(config, 3).eval()
    for p in ref.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.2
    quantize = lambda m: torchao.quantize_(m, torchao.Int8WeightOnlyConfig(),  # noqa: E731
                                           filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and "kv_b" not in fqn)
    quantize(ref)
    fast = KimiMLAAttention(config, 3).eval()
    quantize(fast)
    fast.load_state_dict(ref.state_dict(), assign=True)
    ref.decode_kernels, fast.decode_kernels = "torch", "triton"
    cache_ref, cache_fast = KimiLinearCache(config), KimiLinearCache(config)
    with torch.no_grad():
        x = torch.randn(1, 70, config.hidden_size, generator=gen)  # a prompt: module calls (the latent norm aside)
        assert rel(fast(x, cache=cache_fast), ref(x, cache=cache_ref)) < 1e-6
        x = torch.randn(1, 1, config.hidden_size, generator=gen)
        assert rel(fast(x, cache=cache_fast), ref(x, cache=cache_ref)) < 1e-5
    assert calls == [2, 1]
    calls.clear()
    mlp = KimiMLP(config.hidden_size, 48, decode_kernels="triton")
    quantize(mlp)
    with torch.no_grad():
        x = torch.randn(2, config.hidden_size, generator=gen)
        fast_out = mlp(x)
        mlp.decode_kernels = "torch"
        assert rel(fast_out, mlp(x)) < 1e-5
    assert calls == [2, 1]


def plain_linears(pairs) -> bool:  # noqa: ANN001
    """Whether one launch of plain weights serves every pair."""
    return kernels.launchable(pairs) and all(kernels.linear_kind(t, m) == "plain" for t, m in pairs)


def test_seam_keeps_module_calls_where_they_compute_more(monkeypatch):
    """``plain_linears`` turns down everything a single ``x W^T`` would get wrong: a wrapper or subclass, a bias,
    hooks (accelerate's too), other dtypes or devices, quantized tensor subclasses, autocast, too many tokens or
    pairs; and ``linears`` keeps module calls under autograd and for CPU tensors."""
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(2, 8)
    ok = [(x, lin), (x, nn.Linear(8, 3, bias=False))]
    assert plain_linears(ok)

    class Sub(nn.Linear):
        pass

    assert not plain_linears([(x, Sub(8, 4, bias=False))])
    assert not plain_linears([(x, nn.Linear(8, 4))])  # bias
    assert not plain_linears([(x, lin)] * 7)
    assert not plain_linears([(torch.randn(65, 8), lin)])
    assert not plain_linears([(x, lin), (torch.randn(3, 8), lin)])
    assert not plain_linears([(x.double(), lin)])
    hooked = nn.Linear(8, 4, bias=False)
    handle = hooked.register_forward_pre_hook(lambda m, a: None)
    assert not plain_linears([(x, hooked)])
    handle.remove()
    assert plain_linears([(x, hooked)])
    hooked._hf_hook = object()  # what accelerate's add_hook_to_module leaves on a module it wraps
    assert not plain_linears([(x, hooked)])
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert not plain_linears(ok)
    finally:
        handle.remove()

    class Quantized(torch.Tensor):
        pass

    wrapped = nn.Linear(8, 4, bias=False)
    wrapped.weight = nn.Parameter(lin.weight.detach().as_subclass(Quantized), requires_grad=False)
    assert not plain_linears([(x, wrapped)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not plain_linears(ok)

    def boom(*args, **kwargs):
        raise AssertionError("the kernel was chosen")

    fake = type(sys)("fake")
    fake.multi_linear = boom
    monkeypatch.setitem(sys.modules, "modeling_kimi_linear.multi_linear_triton", fake)
    out = kernels.linears("auto", ok)  # CPU tensors: module calls
    assert torch.equal(out[0], lin(x))
    monkeypatch.setattr(kernels, "resolve_decode_kernels", lambda choice, device: "triton")
    assert kernels.linears("triton", ok)[0].requires_grad  # autograd: module calls
    with torch.no_grad(), pytest.raises(AssertionError, match="chosen"):
        kernels.linears("triton", ok)


COMPILE_SETUP = r"""
from modeling_kimi_linear import multi_linear_triton as m
fn, names = m._multi_linear, m._multi_linear.arg_names
quant, zero = not sys.argv[1].startswith("bf16"), sys.argv[1].startswith("int8-zero")
split, gemv, piped = "split" in sys.argv[1], "gemv" in sys.argv[1], sys.argv[1].endswith("gemv3")
tile = m.INT8_TILE if quant else m.TILE
const = {"BLOCK_M": 1 if gemv else m.BLOCK_M, "BLOCK_N": tile["BLOCK_N"], "BLOCK_K": tile["BLOCK_K"],
         "PRECISION": "tf32", "QUANT": quant, "HAS_ZERO": zero, "K_ALL": 2304, "SX_ALL": 2304, "SPLIT": 1,
         "GEMV": gemv, "LOOP_STAGES": (3 if piped else 1) if gemv else tile["num_stages"],
         "PREFETCH": m.PREFETCH_LINES}  # KDA's launch from x
if split:  # a single o_proj (4096 -> 2304): 16-row tiles, K in 4 parts
    const.update(BLOCK_N=16, K_ALL=4096, SX_ALL=4096, SPLIT=4)
slot_type = {"x": "*bf16", "y": "*bf16", "w": "*i8" if quant else "*bf16",
             "s": "*fp32" if quant else "*bf16", "z": "*i8" if zero else "*fp32" if quant else "*bf16"}
ptr = {n for n in names if n[0] in slot_type and n[1:].isdigit()}
signature = {n: "constexpr" if n in const else slot_type[n[0]] if n in ptr else "i32" for n in names}
signature.update(ws="*fp32", cnt="*i32")
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptr | {"ws", "cnt"}}
options = {"num_warps": m.SPLIT_TILE["num_warps"] if split else tile["num_warps"], "num_stages": tile["num_stages"]}
"""


@pytest.mark.parametrize("weights", ["bf16", "int8", "int8-zero", "bf16-split", "int8-split", "bf16-gemv",
                                     "int8-gemv", "int8-zero-gemv", "int8-split-gemv", "int8-split-gemv3"])
def test_kernel_compiles_for_sm90_without_spills(tmp_path, weights):
    """The interpreter runs Python, not the compiler (which must merge the six slots' pointers and sizes chosen at
    run time): compile the kernel for an H100 / H200 (sm_90, no GPU needed) with its default tile, bf16 and int8
    weights, the split over K of a single o_proj, and the one-token element-wise form, and check that ptxas keeps
    it in registers."""
    assert_compiles_for_sm90_without_spills(tmp_path, COMPILE_SETUP, weights)


def test_checkpoints_carry_the_kernel_module_without_requiring_triton():
    """``save_pretrained`` copies the modules that transformers' relative-import scan finds: the kernel module must
    be among them, and loading must not require triton."""
    from pathlib import Path

    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    package = Path(kernels.__file__).parent
    copied = {Path(p).name for p in get_relative_import_files(str(package / "modeling_kimi_linear.py"))}
    assert "multi_linear_triton.py" in copied
    assert "triton" not in get_imports(str(package / "multi_linear_triton.py"))
