"""Static decode steps (CUDA graphs, compiled CPU steps) only for a model whose weights sit on one device: a model
spread by ``device_map`` over several devices, or offloaded (weights on ``meta``), decodes op by op with one warning.

No GPU here: a ``hf_device_map`` naming two GPUs is set by hand on a CPU model (what ``from_pretrained(...,
device_map=...)`` and accelerate's ``dispatch_model`` set), and a layer moved to ``meta`` stands for offloaded
weights. The compiled CPU step goes through the same decision as CUDA graphs, so ``generate()`` with
``compile_cpu_decode`` shows the hook at work."""

from __future__ import annotations

import warnings

import pytest
import torch

from modeling_kimi_linear import KimiLinearForCausalLM
from modeling_kimi_linear.compiled_decode import CompiledDecoder
from modeling_kimi_linear.device_placement import named_devices, spread_devices, weights_on_one_device
from modeling_kimi_linear.presets import load_preset
from modeling_kimi_linear.transformers_compat import output_cache

TWO_GPUS = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
            "model.layers.3": 1, "model.norm": 1, "lm_head": 1}


def tiny() -> KimiLinearForCausalLM:
    torch.manual_seed(0)
    return KimiLinearForCausalLM(load_preset("tiny")).eval()


def placement_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "spread over" in str(w.message)]


def test_named_devices():
    assert named_devices(None) == set() and named_devices({}) == set()
    assert named_devices(TWO_GPUS) == {"cuda:0", "cuda:1"}
    assert named_devices({"a": 0, "b": "cpu", "c": "disk", "d": "cuda:1"}) == {"cuda:0", "cpu", "disk", "cuda:1"}


def test_one_device_model_keeps_static_steps_without_warning():
    model = tiny()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert spread_devices(model) is None
        assert all(weights_on_one_device(model) for _ in range(3))
        model.hf_device_map = {"": "cpu"}  # from_pretrained(..., device_map="cpu")
        assert weights_on_one_device(model)
    assert placement_warnings(record) == []


def test_device_map_over_two_gpus_falls_back_with_one_warning():
    model = tiny()
    assert weights_on_one_device(model)  # decided and kept before the model is dispatched
    model.hf_device_map = dict(TWO_GPUS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        answers = [weights_on_one_device(model, "CUDA graphs") for _ in range(5)]
    assert answers == [False] * 5
    (message,) = placement_warnings(record)
    assert "cpu, cuda:0, cuda:1" in message and "CUDA graphs" in message and "op by op" in message
    model.hf_device_map = {"": "cpu"}  # a new map is looked at again
    assert weights_on_one_device(model)


def test_offloaded_weights_fall_back():
    model = tiny()
    model.model.layers[2].to("meta")  # accelerate keeps offloaded weights on meta and loads them per forward
    assert spread_devices(model) == ["cpu", "meta"]
    with pytest.warns(UserWarning, match="spread over cpu, meta"):
        assert not weights_on_one_device(model)


def test_static_decoder_for_uses_the_decision():
    """``_static_decoder_for`` picks the compiled step for a one-device model and nothing (op by op) for a spread
    one; no program is compiled here."""
    model = tiny()
    model.compile_cpu_decode = True
    ids = torch.randint(3, 500, (1, 6))
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
        args = (ids[:, -1:], None, cache, None, None, None, True, {})
        assert isinstance(model._static_decoder_for(*args), CompiledDecoder)
        model.hf_device_map = dict(TWO_GPUS)
        with pytest.warns(UserWarning, match="compiled CPU decode steps"):
            assert model._static_decoder_for(*args) is None


def test_generate_on_a_spread_model_decodes_op_by_op_with_one_warning():
    model = tiny()
    prompt = torch.randint(3, 500, (2, 7))
    with torch.no_grad():
        want = model.generate(prompt, do_sample=False, max_new_tokens=6)
        model.compile_cpu_decode = True
        model.hf_device_map = dict(TWO_GPUS)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = model.generate(prompt, do_sample=False, max_new_tokens=6)
            again = model.generate(prompt, do_sample=False, max_new_tokens=6)
    assert len(placement_warnings(record)) == 1
    assert "_compiled_decoder" not in model.__dict__  # nothing was compiled
    assert torch.equal(got, want) and torch.equal(again, want)


def test_offloaded_layers_compute_what_the_model_computes(tmp_path):
    """``from_pretrained(..., device_map=..., offload_folder=...)`` with every other decoder layer offloaded to
    disk and the rest on the CPU: accelerate brings each offloaded module's weights in only around that module's
    own call, so every weight the layers read must come through a module call (the conv taps, KDA's output norm;
    MLA decodes on its expanded path then). The logits of a prompt and greedy ``generate()`` with a cache equal
    those of the same weights loaded plainly."""
    model = tiny()
    model.save_pretrained(tmp_path / "ckpt")
    layers = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(layers)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "some parameters are on the meta device", the static-step warning
        offloaded = KimiLinearForCausalLM.from_pretrained(tmp_path / "ckpt", device_map=device_map,
                                                          offload_folder=tmp_path / "offload").eval()
        assert any(p.device.type == "meta" for p in offloaded.parameters())
        ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(offloaded(ids).logits, model(ids).logits)
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        got = offloaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
