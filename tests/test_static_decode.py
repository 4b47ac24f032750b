"""The static-shape decode step behind CUDA-graph decoding (modeling_kimi_linear/cuda_graph_decode.py).

On a CPU the step runs without a graph (``use_graph=False``): the same code that a CUDA graph captures - latent
rows written at a device-side position, attention over a bucket of rows with the rest masked, KDA states
updated in place. It must give the logits of the ordinary decode step. (Graph capture itself needs a GPU:
bench/gpu_check.py checks it there.)
"""

from __future__ import annotations

import pytest
import torch

from modeling_kimi_linear.cuda_graph_decode import MIN_BUCKET, StaticDecoder, decode_bucket
from modeling_kimi_linear import KimiLinearCache, KimiLinearForCausalLM
from test_cache_generate import MIXES, ids, tiny_model


def test_buckets_cover_every_length_with_bounded_waste():
    previous = 0
    for rows in range(1, 20_000):
        bucket = decode_bucket(rows)
        assert bucket >= rows and bucket >= previous
        assert bucket == MIN_BUCKET or bucket <= 1.25 * rows + 1
        previous = bucket
    assert len({decode_bucket(r) for r in range(4096, 8193)}) == 5  # 4 per doubling (+ the boundary)


@torch.no_grad()
def padded_start(layer_types: list[str], batch: int, prompt: int, pad: int, seed: int):  # noqa: ANN201
    """A tiny model, a static decoder without graphs, and two caches of the same prompt (the second sequence
    left-padded by ``pad``): ``(model, decoder, mask, ordinary cache, static cache, first token)``."""
    model = tiny_model(layer_types)
    x = ids(batch, prompt, seed=seed)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    mask[1, :pad] = 0
    first = model(x, attention_mask=mask)
    static = model(x, attention_mask=mask).past_key_values
    decoder = StaticDecoder(model._decode_logits, use_graph=False)
    return model, decoder, mask, first.past_key_values, static, first.logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("mix", list(MIXES))
def test_static_step_equals_ordinary_decode_across_buckets(mix):
    """From 250 cached tokens over the 256 bucket boundary (the latent buffers grow), with left padding."""
    batch, prompt = 2, 250
    model, decoder, mask, ordinary, static, token = padded_start(MIXES[mix], batch, prompt, pad=9, seed=1)
    worst = 0.0
    with torch.no_grad():
        for _ in range(12):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            want = model(token, attention_mask=mask, past_key_values=ordinary).logits
            got = decoder.step(token, mask, static)
            worst = max(worst, (want - got).abs().max().item())
            token = want[:, -1:].argmax(-1)
    assert static.get_seq_length() == ordinary.get_seq_length() == prompt + 12
    assert worst <= 1e-5
    for layer in range(len(MIXES[mix])):
        a, b = ordinary.kda_state(layer), static.kda_state(layer)
        for t_a, t_b in zip(a, b):
            if t_a is not None:
                assert (t_a - t_b).abs().max().item() <= 1e-5
        if ordinary.latent(layer) is not None:  # deeper layers see attention summed over another row count
            assert (ordinary.latent(layer) - static.latent(layer)).abs().max().item() <= 1e-5


def test_static_step_keeps_tensors_in_place_within_a_bucket():
    """What a captured graph relies on: within a bucket the cache keeps the same tensors step after step."""
    model = tiny_model(MIXES["3:1"])
    decoder = StaticDecoder(model._decode_logits, use_graph=False)
    with torch.no_grad():
        out = model(ids(1, 20))
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decoder.step(token, None, cache)
        key = cache.storage_key()
        for _ in range(5):
            token = decoder.step(token, None, cache)[:, -1:].argmax(-1)
            assert cache.storage_key() == key


@pytest.mark.parametrize("exact", [False, True])
def test_reserved_latent_rows_are_zero(exact):
    """A static step reads the rows past the position with zero attention weight: they must hold finite values
    (0 * NaN from uninitialised memory would be NaN), and the cached rows must survive."""
    model = tiny_model(MIXES["3:1"])
    with torch.no_grad():
        cache = model(ids(2, 20)).past_key_values
        before = cache.latent(3).clone()
        cache.reserve(300, exact=exact)
    buf = cache._latent[3]
    assert buf.shape[1] == 300 if exact else buf.shape[1] >= 300
    assert torch.equal(buf[:, :20], before)
    assert torch.count_nonzero(buf[:, 20:]) == 0


def test_beam_reordering_is_in_place():
    model = tiny_model(MIXES["3:1"])
    with torch.no_grad():
        cache = model(ids(3, 10)).past_key_values
    cache.make_writable()
    key = cache.storage_key()
    before = cache.kda_state(0)[1].clone()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert cache.storage_key() == key
    assert torch.equal(cache.kda_state(0)[1], before[[2, 0, 0]])


def test_new_token_mask_column_and_bad_mask():
    model = tiny_model(MIXES["3:1"])
    decoder = StaticDecoder(model._decode_logits, use_graph=False)
    with torch.no_grad():
        out = model(ids(1, 30))
        ordinary = out.past_key_values
        static = model(ids(1, 30)).past_key_values
        token = out.logits[:, -1:].argmax(-1)
        want = model(token, past_key_values=ordinary).logits
        got = decoder.step(token, torch.ones(1, 1, dtype=torch.long), static)
        assert (want - got).abs().max().item() <= 1e-5
        with pytest.raises(ValueError, match="attention_mask has 5 columns"):
            decoder.step(token, torch.ones(1, 5, dtype=torch.long), static)


def test_cpu_forward_never_takes_the_graph_path():
    """``cuda_graph_decode`` is on by default, and only CUDA inputs use it: a CPU model decodes as before."""
    model = tiny_model(MIXES["3:1"])
    assert model.cuda_graph_decode
    with torch.no_grad():
        out = model(ids(1, 10))
        model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
    assert "_graph_decoder" not in model.__dict__


def test_grown_masks_are_not_copied_again_and_other_masks_are():
    """Within ``generate()`` each step's mask is the last one plus a column of ones (``grown_from``): the static
    step then writes nothing (the padding it holds is the last mask's), and decodes exactly as the ordinary step
    with left padding. A mask that is not the last one grown (``grown_from`` None, or another tensor) is written
    in full. Shown by spoiling the held padding: a skipped write keeps the spoilt column, a full one repairs it."""
    batch, prompt = 2, 30
    model, decoder, mask, ordinary, static, token = padded_start(MIXES["3:1"], batch, prompt, pad=5, seed=2)
    worst = 0.0
    with torch.no_grad():
        for step in range(6):
            grown = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            want = model(token, attention_mask=grown, past_key_values=ordinary).logits
            got = decoder.step(token, grown, static, grown_from=mask if step else None)
            worst = max(worst, (want - got).abs().max().item())
            keys = decoder._inputs[2]
            assert torch.equal(keys[:, : grown.shape[1]], grown.bool()) and bool(keys[:, grown.shape[1]:].all())
            token, mask = want[:, -1:].argmax(-1), grown
        assert worst <= 1e-5
        keys[1, 0] = True  # spoil the held padding
        grown = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        decoder.step(token, grown, static, grown_from=mask)
        assert bool(keys[1, 0]), "a grown mask is not written again"
        mask, grown = grown, torch.cat([grown, grown.new_ones(batch, 1)], 1)
        decoder.step(token, grown, static, grown_from=mask.clone())  # another tensor than the one held
        assert not bool(keys[1, 0]), "a mask grown from another tensor is written in full"


def test_device_position_follows_every_cache():
    """The step moves the device-side position on by one, and the host writes it only when the cache's length
    is not where the last step left it: alternating two caches of other lengths still decodes each exactly."""
    model = tiny_model(MIXES["3:1"])
    decoder = StaticDecoder(model._decode_logits, use_graph=False)
    with torch.no_grad():
        runs = []
        for length, seed in ((30, 3), (21, 4)):
            out = model(ids(1, length, seed=seed))
            runs.append([out.past_key_values, model(ids(1, length, seed=seed)).past_key_values,
                         out.logits[:, -1:].argmax(-1)])
        for _ in range(3):
            for run in runs:
                ordinary, static, token = run
                want = model(token, past_key_values=ordinary).logits
                got = decoder.step(token, None, static)
                assert (want - got).abs().max().item() <= 1e-5
                assert int(decoder._inputs[1]) == static.get_seq_length()
                run[2] = want[:, -1:].argmax(-1)


def test_generate_through_the_static_step_equals_eager_generate(monkeypatch):
    """``generate()`` on a left-padded batch with every decode step through the static step (the code a CUDA graph
    captures, run eagerly on CPU): its masks come grown by the model's own update, so only the first step writes
    one. Tokens and scores equal those of eager generation."""
    model = tiny_model(MIXES["3:1"])
    x = ids(2, 12, seed=6)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(x, **kwargs)
        decoder = StaticDecoder(model._decode_logits, use_graph=False)
        steps = []
        real_step = decoder.step

        def counted(*args, **kw):  # noqa: ANN002, ANN003
            steps.append(kw.get("grown_from") is not None)
            return real_step(*args, **kw)

        decoder.step = counted
        monkeypatch.setattr(type(model), "_static_decoder_for", lambda self, *a, **k: decoder if a[0].shape[1] == 1
                            and isinstance(a[2], KimiLinearCache) and a[2].get_seq_length() > 0 else None)
        static = model.generate(x, **kwargs)
    assert len(steps) == 7 and steps == [True] * 7  # every decode step's mask was the last one grown
    assert torch.equal(eager.sequences, static.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(eager.scores, static.scores)) <= 1e-5


class Linear8bitLt(torch.nn.Linear):
    """Stands in for bitsandbytes' 8-bit layer (matched by type name; bitsandbytes needs a GPU)."""


def test_bitsandbytes_8bit_layers_keep_cuda_graphs_off_with_one_warning(recwarn):
    model = tiny_model(MIXES["3:1"])
    assert model._graph_capture_blocker() is None
    from modeling_kimi_linear.decode_guard import ModelGuard

    ModelGuard(model)  # watches the model's registrations, as a static decoder's guard does
    proj = model.model.layers[0].self_attn.o_proj
    replacement = Linear8bitLt(proj.in_features, proj.out_features, bias=False)
    model.model.layers[0].self_attn.o_proj = replacement  # a registration: the answer is looked up again
    reason = model._graph_capture_blocker()
    assert reason is not None and "model.layers.0.self_attn.o_proj" in reason and "8-bit" in reason
    assert model._graph_capture_blocker() == reason
    warned = [w for w in recwarn if "without CUDA graphs" in str(w.message)]
    assert len(warned) == 1, [str(w.message) for w in recwarn]
    model.model.layers[0].self_attn.o_proj = proj
    assert model._graph_capture_blocker() is None
