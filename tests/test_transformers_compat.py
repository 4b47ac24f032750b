"""The cache argument and output field under either name (transformers 5.24 renamed ``past_key_values`` to
``cache``; 5.23 has only the old name)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from modeling_kimi_linear import KimiLinearCache
from modeling_kimi_linear.transformers_compat import CACHE_FIELD, output_cache
from test_cache_generate import MIXES, ids, tiny_model


def test_cache_field_is_the_installed_versions_name():
    assert CACHE_FIELD in CausalLMOutputWithPast.__dataclass_fields__


def test_cache_under_either_name_gives_the_same_logits():
    model = tiny_model(MIXES["3:1"])
    x = ids(1, 12)
    with torch.no_grad():
        full = model(x, use_cache=False).logits[:, -1]
        steps = {}
        for name in ("cache", "past_key_values"):
            out = model(x[:, :11])
            cache = output_cache(out)
            assert isinstance(cache, KimiLinearCache) and cache.get_seq_length() == 11
            steps[name] = model(x[:, 11:], **{name: cache}).logits[:, -1]
            assert output_cache(model(x[:, :1], **{name: KimiLinearCache(model.config)})).get_seq_length() == 1
    for got in steps.values():
        assert (got - full).abs().max().item() <= 1e-5


def test_both_names_at_once_is_one_clear_error():
    model = tiny_model(MIXES["3:1"])
    with torch.no_grad():
        a = output_cache(model(ids(1, 4)))
        b = output_cache(model(ids(1, 4)))
        with pytest.raises(ValueError, match="not both"):
            model(ids(1, 1), cache=a, past_key_values=b)


def test_generate_and_outputs_print_no_deprecation_warning():
    model = tiny_model(MIXES["3:1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model.generate(ids(1, 5), max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=0)
    assert out.sequences.shape == (1, 9)
    assert output_cache(out).get_seq_length() == 8  # the last new token is not fed back


@pytest.mark.parametrize("with_loss", [False, True])
def test_fast_output_construction_equals_the_dataclass_constructor(with_loss):
    """build_output() skips ModelOutput's per-field bookkeeping; what it builds must be indistinguishable: type,
    keys and their order, attributes (None ones included), item access, to_tuple()."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

    from modeling_kimi_linear.transformers_compat import build_output, cache_field

    cache = KimiLinearCache(tiny_model(MIXES["3:1"]).config)
    logits, loss = torch.randn(1, 2, 8), torch.tensor(1.5) if with_loss else None
    for cls, values in (
        (MoeCausalLMOutputWithPast, dict(loss=loss, logits=logits, **cache_field(cache), hidden_states=None)),
        (MoeModelOutputWithPast, dict(last_hidden_state=logits, **cache_field(cache), router_logits=None)),
    ):
        fast, slow = build_output(cls, **values), cls(**values)
        assert type(fast) is type(slow)
        assert list(fast.keys()) == list(slow.keys())
        assert all(getattr(fast, f) is getattr(slow, f) for f in cls.__dataclass_fields__)
        assert all(fast[k] is slow[k] for k in slow.keys())
        assert len(fast.to_tuple()) == len(slow.to_tuple())
        assert all(a is b for a, b in zip(fast.to_tuple(), slow.to_tuple()))
        assert output_cache(fast) is cache
