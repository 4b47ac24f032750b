"""Hybrid cache and generate(): incremental decoding equals the full forward, padding and packing are exact,
cache size follows the MLA latent, and generate() strategies work."""

from __future__ import annotations

import pytest
import torch

from modeling_kimi_linear import KimiLinearCache, KimiLinearForCausalLM
from modeling_kimi_linear.presets import load_preset
from modeling_kimi_linear.transformers_compat import output_cache

KDA, MLA = "linear_attention", "full_attention"
MIXES = {"3:1": [KDA, KDA, KDA, MLA], "all_kda": [KDA] * 3, "all_mla": [MLA] * 3}


def tiny_model(layer_types=None, seed=0, **overrides) -> KimiLinearForCausalLM:
    if layer_types is not None:
        overrides.update(
            layer_types=layer_types,
            num_hidden_layers=len(layer_types),
            linear_attn_config={"head_dim": 32, "num_heads": 2, "short_conv_kernel_size": 4},
        )
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(load_preset("tiny", **overrides)).eval()


def ids(batch, length, seed=0):
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mix", list(MIXES))
def test_incremental_equals_full_forward(mix):
    model = tiny_model(MIXES[mix])
    x = ids(2, 100)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        out = model(x[:, :37])  # prefill
        cache = out.past_key_values
        parts = [out.logits]
        out = model(x[:, 37:80], past_key_values=cache)  # chunked prefill continues the cache
        parts.append(out.logits)
        for t in range(80, 100):  # token by token
            out = model(x[:, t : t + 1], past_key_values=cache)
            parts.append(out.logits)
    got = torch.cat(parts, 1)
    assert isinstance(cache, KimiLinearCache) and cache.get_seq_length() == 100
    assert (got - full).abs().max().item() <= 1e-5


def test_latent_decode_equals_expanded_attention():
    model = tiny_model(MIXES["all_mla"])
    attn = model.model.layers[0].self_attn
    torch.manual_seed(3)
    q = torch.randn(2, attn.num_heads, 3, attn.q_dim)
    latent = torch.randn(2, 50, attn.kv_lora_rank + attn.rope_dim)
    mask = torch.ones(2, 1, 3, 50, dtype=torch.bool)
    mask[0, ..., :7] = False
    with torch.no_grad():
        absorbed = attn.attend_latent(q, latent, mask)
        expanded = attn.attend_expanded(q, latent, mask)
    assert (absorbed - expanded).abs().max().item() <= 1e-5


def test_latent_decode_of_a_batch_reads_the_absorbed_weights_without_copying_them():
    """At batch > 1 the absorbed products run batched over the heads: no tensor of the batch's size times an
    absorbed weight is allocated (``torch.matmul`` would broadcast the weight and copy it once per sequence)."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model(MIXES["all_mla"])
    attn = model.model.layers[0].self_attn
    bsz = 8
    q = torch.randn(bsz, attn.num_heads, 1, attn.q_dim)
    latent = torch.randn(bsz, 20, attn.kv_lora_rank + attn.rope_dim)
    w_k, _ = attn.absorbed_weights()
    copy_bytes = bsz * w_k.numel() * w_k.element_size()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        attn.attend_latent(q, latent, None)
    biggest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert biggest < copy_bytes, (biggest, copy_bytes)


@pytest.mark.parametrize("mix", list(MIXES))
def test_cache_bytes_follow_the_mla_latent(mix):
    model = tiny_model(MIXES[mix])
    cfg = model.config
    per_token = len(cfg.mla_layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # fp32
    with torch.no_grad():
        cache = model(ids(2, 30)).past_key_values
        before = cache.memory_bytes()
        kda_before = {i: cache.kda_state(i) for i in cfg.kda_layers}
        for t in range(25):
            model(ids(2, 1, seed=t), past_key_values=cache)
    assert cache.memory_bytes() - before == 2 * 25 * per_token
    for i in cfg.kda_layers:  # the KDA part does not grow
        conv, state = cache.kda_state(i)
        assert conv.shape == kda_before[i][0].shape and state.shape == kda_before[i][1].shape
        assert state.dtype == torch.float32


def test_left_padding_equals_single_rows():
    model = tiny_model()
    a, b = ids(1, 25, seed=1), ids(1, 18, seed=2)
    batch = torch.zeros(2, 25, dtype=torch.long)
    mask = torch.zeros(2, 25, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 7:], mask[1, 7:] = b[0], 1
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        for row, single in ((0, a), (1, b)):
            ref = model.generate(single, max_new_tokens=12, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            assert torch.equal(out.sequences[row, -12:], ref.sequences[0, -12:])
            err = max((x[row] - y[0]).abs().max().item() for x, y in zip(out.logits, ref.logits))
            assert err <= 1e-5, f"row {row}: logits differ by {err}"


def test_padded_positions_change_no_state():
    model = tiny_model()
    x = ids(1, 20)
    padded = torch.cat([torch.zeros(1, 9, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], 1)
    with torch.no_grad():
        c1 = model(x).past_key_values
        c2 = model(padded, attention_mask=mask).past_key_values
    for i in model.config.kda_layers:
        (conv1, s1), (conv2, s2) = c1.kda_state(i), c2.kda_state(i)
        assert torch.allclose(s1, s2, atol=1e-6) and torch.allclose(conv1, conv2, atol=1e-6)


def test_right_padded_training_batch():
    model = tiny_model()
    x = ids(2, 30)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 21:] = 0
    with torch.no_grad():
        batch = model(x, attention_mask=mask, use_cache=False).logits
        alone = model(x[1:, :21], use_cache=False).logits
    assert (batch[1, :21] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("how", ["position_ids", "cu_seqlens"])
def test_packed_equals_separate(how):
    model = tiny_model()
    docs = [ids(1, n, seed=n) for n in (23, 70, 9)]
    packed = torch.cat(docs, 1)
    kwargs = {}
    if how == "position_ids":
        kwargs["position_ids"] = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    else:
        kwargs["cu_seqlens"] = torch.tensor([0, 23, 93, 102])
    with torch.no_grad():
        got = model(packed, use_cache=False, **kwargs).logits
        want = torch.cat([model(d, use_cache=False).logits for d in docs], 1)
    assert (got - want).abs().max().item() <= 1e-5


def test_packed_eval_forward_without_cache_asked():
    """An eval forward over packed documents with ``use_cache`` not passed (the config default is True) runs without
    a cache and gives each document's logits alone; a plain forward still returns its cache; asking for a cache with
    packed documents is one clear error."""
    model = tiny_model()
    docs = [ids(1, n, seed=n) for n in (23, 70, 9)]
    packed = torch.cat(docs, 1)
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        out = model(input_ids=packed, position_ids=pos)
        want = torch.cat([model(d, use_cache=False).logits for d in docs], 1)
        assert output_cache(out) is None
        assert (out.logits - want).abs().max().item() <= 1e-5
        assert isinstance(output_cache(model(input_ids=docs[0])), KimiLinearCache)  # the default cache, unpacked
        with pytest.raises(ValueError, match="packed sequences .* cannot be used with a cache"):
            model(input_ids=packed, position_ids=pos, use_cache=True)
        with pytest.raises(ValueError, match="packed sequences .* cannot be used with a cache"):
            model(input_ids=packed, position_ids=pos, past_key_values=KimiLinearCache(model.config))
        # generate() with a prompt of one document decodes as before: tokens equal to greedy argmax over full forwards
        prompt = docs[0][:, :10]
        got = model.generate(prompt, do_sample=False, max_new_tokens=5)
        seq = prompt
        for _ in range(5):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq)


def test_beam_search_scores_match_full_forward_recomputation():
    model = tiny_model()
    prompt = ids(1, 12)
    with torch.no_grad():
        out = model.generate(prompt, num_beams=4, num_return_sequences=4, max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, output_scores=True, return_dict_in_generate=True,
                             length_penalty=0.0, early_stopping=True)
        for seq, score in zip(out.sequences, out.sequences_scores):
            logp = model(seq[None], use_cache=False).logits.log_softmax(-1)[0]
            total = sum(logp[t - 1, seq[t]].item() for t in range(12, seq.shape[0]))
            assert abs(total - score.item()) <= 1e-4


def test_generate_strategies_and_cache_continuation():
    from transformers import TextStreamer

    model = tiny_model()
    prompt = ids(1, 10)
    with torch.no_grad():
        sampled = model.generate(prompt, do_sample=True, top_k=20, temperature=0.8, max_new_tokens=8)
        penalised = model.generate(prompt, do_sample=False, repetition_penalty=1.3, max_new_tokens=8)
        assert sampled.shape == penalised.shape == (1, 18)
        # continuing from a returned cache gives the same tokens as generating in one go
        first = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                               return_dict_in_generate=True)
        cont = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=5,
                              min_new_tokens=5, do_sample=False)
        once = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(cont, once)

    class Collect(TextStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            pass

    streamer = Collect()
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, streamer=streamer)
    assert len(streamer.chunks) == 5  # the prompt, then one chunk per new token


def test_logits_to_keep():
    model = tiny_model()
    x = ids(2, 40)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        last = model(x, use_cache=False, logits_to_keep=1).logits
    assert last.shape == (2, 1, 512) and torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_crop_and_batch_ops():
    model = tiny_model(MIXES["all_mla"])
    with torch.no_grad():
        cache = model(ids(2, 12)).past_key_values
    cache.crop(8)  # no KDA state: croppable
    assert cache.get_seq_length() == 8
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert cache.batch_size == 2
    hybrid = tiny_model()
    with torch.no_grad():
        cache = hybrid(ids(1, 12)).past_key_values
    with pytest.raises(ValueError, match="recurrent state"):
        cache.crop(5)


@pytest.mark.slow
def test_long_generation_memory_is_linear_in_mla_only():
    model = tiny_model()
    cfg = model.config
    with torch.no_grad():
        out = model.generate(ids(1, 16), max_new_tokens=2000, min_new_tokens=2000, do_sample=False,
                             return_dict_in_generate=True)
    cache = out.past_key_values
    per_token = len(cfg.mla_layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    kda = sum(c.numel() * c.element_size() + s.numel() * s.element_size()
              for c, s in (cache.kda_state(i) for i in cfg.kda_layers))
    assert cache.memory_bytes() == kda + cache.get_seq_length() * per_token


def _word_tokenizer(vocab_size: int = 512):
    """A word-level tokenizer built locally (no hub): words w0..w{n} plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_pipeline_and_text_streamer():
    from transformers import TextStreamer, pipeline

    model = tiny_model()
    tokenizer = _word_tokenizer()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("w5 w6 w7", max_new_tokens=6, min_new_tokens=6, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("w5 w6 w7")
    # the pipeline's continuation is exactly greedy generate()'s
    ids = tokenizer("w5 w6 w7", return_tensors="pt").input_ids
    with torch.no_grad():
        direct = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    new_words = tokenizer.decode(direct[0, ids.shape[1] :]).split()
    assert len(new_words) == 6 and text[len("w5 w6 w7") :].split() == new_words

    class Capture(TextStreamer):
        def __init__(self, tok):
            super().__init__(tok, skip_prompt=True)
            self.text = ""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text += text

    streamer = Capture(tokenizer)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=streamer)
    assert streamer.text.split() == new_words


def test_stability_over_8k_tokens_fp32_and_bf16():
    """Tiny preset over 8K tokens: prefill 8K - 64 tokens, then 64 decode steps, in fp32 and in bf16: everything
    stays finite, the recurrent states stay bounded, and bf16 tracks fp32."""
    x = ids(1, 8192, seed=5)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model().to(dtype)
        with torch.no_grad():
            out = model(x[:, :-64], logits_to_keep=1)
            cache, logits = out.past_key_values, [out.logits[:, -1].float()]
            for t in range(8192 - 64, 8192):
                logits.append(model(x[:, t : t + 1], past_key_values=cache).logits[:, -1].float())
        logits = torch.cat(logits)
        assert torch.isfinite(logits).all()
        for i in model.config.kda_layers:
            state = cache.kda_state(i)[1]
            assert state.dtype == torch.float32 and torch.isfinite(state).all()
            # q/k are L2-normalised and beta <= 1: a row of S cannot grow past what v feeds it
            assert state.abs().max().item() < 1e3
        results[dtype] = logits
    err = (results[torch.bfloat16] - results[torch.float32]).norm() / results[torch.float32].norm()
    assert err.item() < 5e-2, f"bf16 drifted from fp32 by {err.item():.3g} over 8K tokens"
