"""Static decode steps never outlive the model they were built from (modeling_kimi_linear/decode_guard.py).

A compiled CPU program or a captured CUDA graph replays what it saw when it was built. These tests change the model
in each way a user can - other weights of the same shape (another checkpoint, ``load_state_dict(assign=True)``,
new ``nn.Parameter``s), a dtype cast, LoRA adapters added, switched off, switched to another or merged - and check
that the compiled step then decodes exactly what op-by-op decoding gives. The guard's detection itself is checked
directly, change by change (that part also protects the CUDA-graph path, checked on a GPU by
``bench/gpu_check.py --only guard``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_kimi_linear import KimiLinearForCausalLM, compiled_decode
from modeling_kimi_linear.decode_guard import ModelGuard
from test_cache_generate import MIXES, ids, tiny_model

REPO = Path(__file__).resolve().parent.parent


def randomize(model: KimiLinearForCausalLM, seed: int) -> KimiLinearForCausalLM:
    """Give every tensor of ``model`` new values (router correction biases and KDA's fp32 gates included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if name.endswith("e_score_correction_bias"):
                p.copy_(noise)  # moves which experts are chosen
            else:
                p.add_(0.05 * noise)
    return model


def decode_gap(model, steps: int = 6, batch: int = 2, expect_compiled: bool = True) -> float:  # noqa: ANN001
    """Largest logit difference between compiled and op-by-op decoding of ``steps`` greedy tokens of ``model``
    (ours or a PEFT wrapper); fails if the compiled step fell back to op by op, unless ``expect_compiled`` is False."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    x = ids(batch, 20, seed=5)
    logits = {}
    for compiled in (False, True):
        base.compile_cpu_decode = compiled
        with torch.no_grad():
            out = model(input_ids=x)
            cache, token, seen = out.past_key_values, out.logits[:, -1:].argmax(-1), []
            for _ in range(steps):
                out = model(input_ids=token, past_key_values=cache)
                seen.append(out.logits)
                token = (logits[False][len(seen) - 1] if compiled else out.logits)[:, -1:].argmax(-1)
        logits[compiled] = seen
    base.compile_cpu_decode = False
    decoder = base.__dict__.get("_compiled_decoder")
    assert decoder is not None and decoder._failed != expect_compiled, f"fell back to op by op: {decoder._failed}"
    return max((a - b).abs().max().item() for a, b in zip(logits[True], logits[False]))


@pytest.fixture(scope="module")
def program_dir(tmp_path_factory):
    """One program folder for the module: the tiny model's program is compiled once and shared."""
    path = tmp_path_factory.mktemp("programs")
    old = os.environ.get(compiled_decode.PROGRAM_DIR_ENV)
    os.environ[compiled_decode.PROGRAM_DIR_ENV] = str(path)
    yield path
    if old is None:
        os.environ.pop(compiled_decode.PROGRAM_DIR_ENV)
    else:
        os.environ[compiled_decode.PROGRAM_DIR_ENV] = old


# ---------------------------------------------------------------------------------------------- the guard itself
def test_guard_sees_every_kind_of_change():
    """Each change that a replayed step would miss is reported by the cheap per-step check; values written into
    the same memory (which every static step reads afresh) are not a change."""
    model = tiny_model(MIXES["3:1"])
    guard = ModelGuard(model)
    gate = model.model.layers[1].block_sparse_moe.gate
    proj = model.model.layers[3].self_attn.o_proj
    assert not guard.changed() and not guard.signature_changed()

    with torch.no_grad():
        proj.weight.mul_(2.0)
        gate.e_score_correction_bias.add_(1.0)
    assert not guard.changed(), "in-place values are read by every static step: no rebuild needed"

    changes = {
        "new Parameter": lambda: setattr(gate, "e_score_correction_bias",
                                         torch.nn.Parameter(torch.ones(8), requires_grad=False)),
        "load_state_dict(assign=True)": lambda: model.load_state_dict(
            {k: v.clone() for k, v in model.state_dict().items()}, assign=True),
        "param.data = ...": lambda: setattr(proj.weight, "data", proj.weight.detach().clone()),
        "model.to(float64)": lambda: model.to(torch.float64),
        "a module swapped": lambda: setattr(model.model.layers[0].self_attn, "q_proj",
                                            torch.nn.Linear(64, 64, bias=False, dtype=torch.float64)),
    }
    for what, change in changes.items():
        guard.refresh()
        change()
        assert guard.changed(), what
    guard.refresh()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert guard.changed(), "autocast on"
    assert not guard.changed()


def test_a_dtype_reinterpreted_in_place_is_seen_at_the_next_cache():
    """The one change the per-step check leaves to the thorough one (the module docstring says so): a weight
    reinterpreted as another dtype of the same size keeps its memory, so its address, and only the check at the
    next cache (every ``generate()`` call) sees it; a cast to another dtype moves memory and is seen at once."""
    model = tiny_model(MIXES["3:1"]).to(torch.bfloat16)
    proj = model.model.layers[0].self_attn.q_proj
    guard = ModelGuard(model)
    proj.weight.data = proj.weight.data.view(torch.float16)
    assert not guard.changed() and guard.signature_changed()
    guard.refresh()
    proj.weight.data = proj.weight.data.to(torch.float32)
    assert guard.changed()


def test_registrations_outside_the_model_are_no_change():
    """Modules built or wired up elsewhere - a compiled step's own wrapper holding the model as a submodule, a
    second model - change nothing a static step of this model reads; the same registration on one of the model's
    modules does."""
    model = tiny_model(MIXES["3:1"])
    guard = ModelGuard(model)
    holder = torch.nn.Module()
    holder.model = model  # what compiled_decode.StepProgram does on every program build
    holder.extra = torch.nn.Linear(4, 4)
    tiny_model(MIXES["3:1"])
    assert not guard.changed() and not guard.signature_changed()
    model.model.layers[0].extra = torch.nn.Linear(4, 4)
    assert guard.changed()


def test_thorough_check_sees_attributes_and_hooks():
    """At every new cache, attributes of this package's own modules and hooks are compared too."""
    model = tiny_model(MIXES["3:1"])
    guard = ModelGuard(model)
    model.model.layers[0].self_attn.backend = "torch"
    assert guard.signature_changed()
    guard.refresh()
    handle = model.model.layers[2].register_forward_hook(lambda *args: None)
    assert guard.signature_changed()
    guard.refresh()
    handle.remove()
    assert guard.signature_changed()


def test_guard_sees_adapter_switches():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(MIXES["3:1"]), peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    guard = ModelGuard(model.get_base_model())
    assert not guard.changed()
    with model.disable_adapter():
        assert guard.changed()
    assert not guard.changed()
    model.set_adapter("second")
    assert guard.changed()
    guard.refresh()
    model.base_model.merge_adapter()
    assert guard.changed()


def test_program_key_covers_structure_but_not_values():
    """Checkpoints of one shape share a key (no value is baked into a program); adapters or dtype do not."""
    a, b = randomize(tiny_model(MIXES["3:1"]), 1), randomize(tiny_model(MIXES["3:1"], seed=3), 2)
    assert ModelGuard(a).key == ModelGuard(b).key
    assert ModelGuard(a.to(torch.float64)).key != ModelGuard(b).key


# ------------------------------------------------------------------------------------- compiled decode end to end
_FRESH_PROCESS = """
import json, sys, torch
sys.path[:0] = [{repo!r}, {tests!r}]
from modeling_kimi_linear import KimiLinearForCausalLM
from test_decode_guard import decode_gap
model = KimiLinearForCausalLM.from_pretrained({path!r}).eval()
print(json.dumps({{"gap": decode_gap(model)}}))
"""


def test_checkpoints_of_one_shape_each_decode_their_own_values(program_dir, tmp_path):
    """Three checkpoints of one shape, every tensor different (router biases included), one program folder, each
    decoded compiled and op by op in a fresh process: equal, and one program serves all three."""
    for seed in range(3):
        randomize(tiny_model(MIXES["3:1"], seed=seed), 100 + seed).save_pretrained(tmp_path / f"ckpt{seed}")
    env = dict(os.environ, **{compiled_decode.PROGRAM_DIR_ENV: str(program_dir)})
    for seed in range(3):
        script = _FRESH_PROCESS.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(tmp_path / f"ckpt{seed}"))
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        gap = json.loads(done.stdout.strip().splitlines()[-1])["gap"]
        assert gap <= 1e-5, f"checkpoint {seed}: compiled decode differs from op by op by {gap}"
    assert len(list(program_dir.glob("decode-*.pt2"))) == 1


def test_replaced_parameters_are_followed_within_one_process(program_dir):
    """load_state_dict(assign=True) with another checkpoint's values, then a new nn.Parameter for a router
    bias: the compiled step decodes the new values (the program is reloaded, not recompiled)."""
    model = randomize(tiny_model(MIXES["3:1"]), 7)
    assert decode_gap(model) <= 1e-5
    other = randomize(tiny_model(MIXES["3:1"], seed=9), 8)
    model.load_state_dict(other.state_dict(), assign=True)
    assert decode_gap(model) <= 1e-5
    gate = model.model.layers[2].block_sparse_moe.gate
    gate.e_score_correction_bias = torch.nn.Parameter(torch.randn(8) * 2, requires_grad=False)
    assert decode_gap(model) <= 1e-5
    assert len(list(program_dir.glob("decode-*.pt2"))) == 1


def test_a_change_between_two_steps_of_one_cache_is_followed(program_dir):
    """The per-step check: a router bias replaced in the middle of a decode (same cache) is used by the very next
    compiled step."""
    model = randomize(tiny_model(MIXES["3:1"]), 13)
    x = ids(2, 20, seed=6)
    gate = model.model.layers[3].block_sparse_moe.gate
    bias = torch.randn(8, generator=torch.Generator().manual_seed(14)) * 3
    logits = {}
    for compiled in (False, True):
        model.compile_cpu_decode = compiled
        gate.e_score_correction_bias = torch.nn.Parameter(torch.zeros(8), requires_grad=False)
        with torch.no_grad():
            out = model(x)
            cache, token, seen = out.past_key_values, out.logits[:, -1:].argmax(-1), []
            for step in range(6):
                if step == 3:
                    gate.e_score_correction_bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
                out = model(token, past_key_values=cache)
                seen.append(out.logits)
                token = (logits[False][step] if compiled else out.logits)[:, -1:].argmax(-1)
        logits[compiled] = seen
    model.compile_cpu_decode = False
    assert max((a - b).abs().max().item() for a, b in zip(logits[True], logits[False])) <= 1e-5


def test_a_program_is_loaded_once_for_many_steps_and_calls(program_dir, monkeypatch):
    """Nothing changes, nothing is rebuilt: two greedy generate() calls load the program once (building a step's
    program registers modules of its own, which once made every step rebuild and reload it: ~10x slower)."""
    model = randomize(tiny_model(MIXES["3:1"]), 17)
    model.compile_cpu_decode = True
    loads = []
    real = compiled_decode._load
    monkeypatch.setattr(compiled_decode, "_load", lambda *a, **k: loads.append(1) or real(*a, **k))
    with torch.no_grad():
        for _ in range(2):
            model.generate(ids(2, 20, seed=7), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    model.compile_cpu_decode = False
    assert len(loads) == 1


def test_a_program_that_would_bake_in_weights_is_refused(monkeypatch, tmp_path):
    """If inductor ever inlined a weight despite the settings (the compiled program then lists fewer inputs than
    the exported step reads), the program is neither used nor kept: one warning, op-by-op decoding."""

    class Inlined:  # what loading such a program shows: the router biases are not among its inputs
        def __init__(self, names: list[str]) -> None:
            self.names = names

        def get_constant_fqns(self) -> list[str]:
            return [n for n in self.names if "e_score_correction_bias" not in n]

    model = tiny_model(MIXES["3:1"])
    names = ["model." + n for n, _ in model.named_parameters()]
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda program, package_path, **kw: None)
    monkeypatch.setattr(compiled_decode, "_load", lambda path, strict=False: Inlined(names))
    monkeypatch.setenv(compiled_decode.PROGRAM_DIR_ENV, str(tmp_path))
    with pytest.warns(RuntimeWarning, match="bakes in 3 model tensor"):
        gap = decode_gap(model, steps=2, expect_compiled=False)
    assert gap <= 1e-5
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_adapters_switched_on_off_to_another_and_merged(program_dir):
    """PEFT LoRA: compiled decode equals op by op with the adapter on, inside ``disable_adapter()``, after
    ``set_adapter`` to a second adapter, and after merging."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(randomize(tiny_model(MIXES["3:1"]), 11),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj", "kv_a_proj_with_mqa"]))
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj", "kv_a_proj_with_mqa"]))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # random, so that each adapter changes the output
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval()
    assert decode_gap(model) <= 1e-5
    with model.disable_adapter():
        assert decode_gap(model) <= 1e-5
    assert decode_gap(model) <= 1e-5
    model.set_adapter("second")
    assert decode_gap(model) <= 1e-5
    model.base_model.merge_adapter()
    assert decode_gap(model) <= 1e-5


@pytest.mark.slow
def test_a_cast_model_gets_its_own_program(program_dir):
    """After ``model.to(bfloat16)`` the fp32 program is not replayed on the new tensors: a bf16 program is loaded
    (or compiled), and decodes like op by op within bf16 rounding (inductor rounds fused chains once, eager
    rounds every op)."""
    model = randomize(tiny_model(MIXES["3:1"]), 12)
    assert decode_gap(model) <= 1e-5
    before = set(program_dir.glob("decode-*.pt2"))
    model.to(torch.bfloat16)
    assert decode_gap(model, steps=3) <= 0.1
    assert set(program_dir.glob("decode-*.pt2")) - before, "no program was built for the bf16 model"


def test_guard_sees_a_quantized_weight_moved():
    """A torchao weight is a wrapper tensor whose own ``data_ptr()`` is 0: the guard follows the tensors inside."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = tiny_model(MIXES["3:1"])
    quantize_(model.model.layers[0].self_attn, Int8WeightOnlyConfig())
    guard = ModelGuard(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert not guard.changed()
    torch.utils.swap_tensors(weight, torch.nn.Parameter(weight.detach().clone(), requires_grad=False))
    assert weight is model.model.layers[0].self_attn.q_proj.weight  # same object, new memory inside
    assert guard.changed()


def test_guard_sees_an_inner_tensor_of_a_quantized_weight_replaced_or_moved():
    """The per-step check lists a wrapper's inner tensors once: a new inner object, or an inner tensor given new
    memory, is a change; values written in place (the same memory) and putting the original back are not."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = tiny_model(MIXES["3:1"])
    quantize_(model.model.layers[0].self_attn, Int8WeightOnlyConfig())
    guard = ModelGuard(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    original = weight.qdata
    weight.qdata = original.clone()
    assert guard.changed()
    weight.qdata = original
    assert not guard.changed()
    original.add_(1)  # in place: a static step reads the new values from the same memory
    assert not guard.changed()
    original.data = original.detach().clone()  # same object, new memory
    assert guard.changed()


def test_guard_follows_int8_models_of_one_shape_through_assignments_and_adapters():
    """Two int8 checkpoints of one shape (every tensor different): the second's weights assigned into the first
    are a change, and so are a LoRA adapter switched off over the int8 weights and a cast of the model; switched on
    again, or with nothing changed, the check says none, and after a refresh the model counts as seen. The quantized weights' values are checked
    to differ, so an assignment that kept the old memory would show."""
    pytest.importorskip("torchao")
    peft = pytest.importorskip("peft")
    from torchao.quantization import Int8WeightOnlyConfig

    from modeling_kimi_linear.presets import load_preset
    from modeling_kimi_linear.random_weights import build_random_model

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_random_model(load_preset("tiny"), "cpu", torch.float32,
                                         quantization=Int8WeightOnlyConfig()))
    first, second = models
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        a, b = (t.dequantize() if hasattr(t, "dequantize") else t for t in (a, b))
        if a.numel() > 1 and not name.endswith(("layernorm.weight", "norm.weight", "e_score_correction_bias")):
            assert not torch.equal(a, b), name
    guard = ModelGuard(first)
    assert not guard.changed()
    first.load_state_dict(second.state_dict(), assign=True)
    assert guard.changed() and guard.signature_changed()
    guard.refresh()
    assert not guard.changed() and not guard.signature_changed()
    wrapped = peft.get_peft_model(first, peft.LoraConfig(r=4, target_modules=["o_proj"]))
    guard = ModelGuard(wrapped)
    with wrapped.disable_adapter():
        assert guard.changed()
    assert not guard.changed()  # on again: the state the guard recorded
    wrapped.to(torch.bfloat16)  # the high-precision weights (router, norms, kv_b_proj...) cast: new memory
    assert guard.changed()
