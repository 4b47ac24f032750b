"""examples/finetune.py: command-line runs on the tiny preset with the built-in byte tokenizer (CPU, subprocess), and
its data handling, byte tokenizer and error reporting (in process)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_kimi_linear import KimiLinearForCausalLM
from modeling_kimi_linear.presets import load_preset

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "finetune.py"
WORDS = "the cat sat on a mat and the dog ran to the red ball while birds sang in green trees".split()
COMMON = ["--preset", "tiny", "--byte-tokenizer", "--cpu", "--block-size", "64", "--batch-size", "4",
          "--max-steps", "30", "--logging-steps", "1"]


def finetune_module():
    """The script imported as a module (once)."""
    name = "finetune_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_corpus(path: Path, docs: int = 120, fixed_chars: int | None = None) -> Path:
    """Blank-line separated documents of rotating words (learnable); ``fixed_chars`` makes every document exactly
    that many characters (ASCII, so as many byte tokens)."""
    out = []
    for i in range(docs):
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 9))
        if fixed_chars is not None:
            text = (text + " " + text * 10)[:fixed_chars]
        out.append(text)
    path.write_text("\n\n".join(out) + "\n")
    return path


def run_script(*args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def metrics_of(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["train_losses"]
    assert len(losses) == metrics["steps"] == 30, "a loss is logged at every step"
    assert metrics["train_loss_first5_mean"] == pytest.approx(sum(losses[:5]) / 5)
    assert metrics["train_loss_last5_mean"] == pytest.approx(sum(losses[-5:]) / 5)
    assert metrics["tokens_per_second"] == pytest.approx(metrics["train_tokens"] / metrics["train_runtime_s"])
    return metrics


def assert_loss_fell(metrics: dict, factor: float) -> None:
    first, last = metrics["train_loss_first5_mean"], metrics["train_loss_last5_mean"]
    assert last < factor * first, f"loss did not fall enough: first 5 {first:.3f}, last 5 {last:.3f}"


def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


def generates_like_without_cache(model, tokenizer, text: str = "the cat sat") -> str:
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, prompt.shape[1] + 12)
    assert torch.equal(out, greedy_without_cache(model, prompt, 12))
    return tokenizer.decode(out[0])


def doc_loss(model, tokenizer, text: str) -> float:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids, use_cache=False).loss.item()


# ------------------------------------------------------------------------------------------------ subprocess runs
def test_help_lists_the_options():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--preset", "--model-class", "--tokenizer", "--byte-tokenizer", "--train-file",
                   "--eval-file", "--packing", "--block-size", "--lora", "--lora-r", "--lora-alpha", "--lora-targets",
                   "--gradient-checkpointing", "--bf16", "--max-steps", "--lr", "--batch-size", "--grad-accum",
                   "--output-dir", "--seed", "--router-aux-loss-coef"):
        assert option in proc.stdout, option


def test_full_finetune_loss_falls_and_the_saved_model_reloads_and_generates(tmp_path):
    from transformers import AutoTokenizer

    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "full"
    proc = run_script(*COMMON, "--lr", "3e-3", "--train-file", corpus, "--output-dir", out)
    assert "train loss: first" in proc.stdout and "tokens/s:" in proc.stdout
    metrics = metrics_of(out)
    assert_loss_fell(metrics, 0.6)
    # everything trains except the routers' correction biases (kept out of backprop, as in the release)
    config = load_preset("tiny")
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    assert metrics["trainable_parameters"] == metrics["total_parameters"] - moe_layers * config.num_experts
    assert 0 < metrics["train_tokens"] <= 30 * 4 * 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "full"], "no staging directory is left"

    assert json.loads((out / "config.json").read_text())["use_cache"]  # Trainer turns it off; saving restores it
    model = KimiLinearForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    untrained = KimiLinearForCausalLM(load_preset("tiny")).eval()
    text = corpus.read_text().split("\n\n")[3]
    assert doc_loss(model, tokenizer, text) < 0.7 * doc_loss(untrained, tokenizer, text)
    assert generates_like_without_cache(model, tokenizer).startswith("the cat sat")


def test_lora_run_saves_an_adapter_that_reloads_merges_and_generates(tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "lora"
    run_script(*COMMON, "--lr", "1e-2", "--lora", "--lora-r", "8", "--lora-alpha", "16", "--merge-lora",
               "--train-file", corpus, "--output-dir", out)
    metrics = metrics_of(out)
    # the random base's frozen final norm and lm_head bound the logits (|logit| <~ 1.3 here), so adapters alone
    # cannot go far below log(512) = 6.24 on this toy: ask for half a nat
    assert metrics["train_loss_last5_mean"] < metrics["train_loss_first5_mean"] - 0.5, metrics["train_losses"]
    assert metrics["lora"] and metrics["trainable_parameters"] < metrics["total_parameters"] / 2
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "base/model.safetensors",
                 "merged/model.safetensors"):
        assert (out / name).is_file(), name

    tokenizer = AutoTokenizer.from_pretrained(out)
    base = KimiLinearForCausalLM.from_pretrained(out / "base").eval()
    ids = torch.tensor([tokenizer("the dog ran to the red ball", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(base, out).eval()
    merged = KimiLinearForCausalLM.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        adapted_logits = adapted(input_ids=ids).logits
        assert (adapted_logits - base_logits).abs().max() > 0.1, "the adapter was trained"
        assert (merged(input_ids=ids).logits - adapted_logits).abs().max() < 1e-4
    generates_like_without_cache(adapted, tokenizer)


def test_lora_on_a_model_initialised_on_the_device(tmp_path):
    """The recipe for the 48B layout on one GPU, on the tiny preset and a CPU (float32 here, so that the merge is
    checked tightly; the bf16 build is checked below): random weights made on the device (--init-on-device),
    gradient checkpointing, frozen base, adapters saved without the base, merged in memory and checked against the
    adapted model (--merge-lora check), peak memory reported."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "lora-device"
    proc = run_script("--preset", "tiny", "--init-on-device", "--byte-tokenizer", "--cpu", "--lora",
                      "--gradient-checkpointing", "--skip-base", "--merge-lora", "check", "--lr", "1e-2",
                      "--block-size", "64", "--batch-size", "2", "--max-steps", "4", "--warmup-steps-excluded", "1",
                      "--train-file", corpus, "--output-dir", out)
    assert "peak memory:" in proc.stdout and "merged model vs adapters" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["gradient_checkpointing"] and metrics["lora"]
    assert all(math.isfinite(loss) for loss in metrics["train_losses"]) and metrics["tokens_per_second"] > 0
    assert metrics["trainable_parameters"] < metrics["total_parameters"] / 2
    assert metrics["peak_memory_GB"] > 0 and "ru_maxrss" in metrics["peak_memory_kind"]
    check = metrics["merge_check"]
    assert check["tokens"] > 1 and check["max_abs_logit_diff"] < 1e-4 < check["adapter_effect"] / 100, check
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "base").exists() and not (out / "merged").exists()


def test_init_on_device_builds_bf16_weights_with_fp32_decay_parameters():
    module = finetune_module()
    args = module.parse_args(["--preset", "tiny", "--init-on-device", "--dtype", "bfloat16", "--cpu",
                              "--train-file", "x.txt", "--output-dir", "unused"])
    model = module.load_model(args)
    assert model.training
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith(("A_log", "dt_bias")) else torch.bfloat16), name
        assert torch.isfinite(p).all(), name
    with pytest.raises(SystemExit):
        module.parse_args(["--model", "ckpt", "--init-on-device", "--train-file", "x.txt", "--output-dir", "o"])
    with pytest.raises(module.FinetuneError, match="no configuration preset 'nope'"):
        module.load_model(module.parse_args(["--preset", "nope", "--train-file", "x.txt", "--output-dir", "o"]))


def test_packing_run_counts_every_token_and_trains(tmp_path):
    """Documents of exactly 63 bytes + end of sequence = 64 tokens = one block, so 30 packed steps of 4 examples
    see exactly 30 * 4 * 64 tokens. Also covers the router balance loss and the eval file."""
    corpus = write_corpus(tmp_path / "corpus.txt", fixed_chars=63)
    held_out = write_corpus(tmp_path / "eval.txt", docs=8)
    out = tmp_path / "packed"
    run_script(*COMMON, "--lr", "3e-3", "--packing", "--router-aux-loss-coef", "0.01", "--train-file", corpus,
               "--eval-file", held_out, "--output-dir", out)
    metrics = metrics_of(out)
    assert metrics["packing"] and metrics["train_tokens"] == 30 * 4 * 64
    assert_loss_fell(metrics, 0.6)
    assert metrics["eval_loss"] < metrics["train_loss_first"]
    config = json.loads((out / "config.json").read_text())
    assert config["router_aux_loss_coef"] == 0.01 and not config["output_router_logits"]
    KimiLinearForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_chat_run_trains_on_assistant_turns(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"add {i % 7} and {i % 5}"},
                          {"role": "assistant", "content": f"{i % 7} plus {i % 5} is {i % 7 + i % 5}."}]}
            for i in range(60)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "chat"
    run_script(*COMMON, "--lr", "3e-3", "--train-file", data, "--output-dir", out)
    metrics = metrics_of(out)
    assert metrics["chat_loss_masks"] == {"markers": 60}
    assert_loss_fell(metrics, 0.6)


@pytest.mark.slow
def test_native_model_class_runs_the_same_recipe(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "native"
    run_script(*COMMON, "--lr", "3e-3", "--model-class", "native", "--lora", "--train-file", corpus,
               "--output-dir", out)
    metrics = metrics_of(out)
    assert metrics["model_class"] == "native"
    assert metrics["train_loss_last5_mean"] < metrics["train_loss_first5_mean"] - 0.5, metrics["train_losses"]


# ------------------------------------------------------------------------------------------------ in process
def test_byte_tokenizer_maps_bytes_to_ids_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    ft = finetune_module()
    tokenizer = ft.build_byte_tokenizer()
    text = "héllo wörld ✓\n\ttabs & <tags>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [3 + b for b in text.encode("utf-8")]
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 259 <= load_preset("tiny").vocab_size
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids and again.eos_token_id == 2


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi ✓"},
                {"role": "assistant", "content": "hello ✓"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "bye"}]
RENDERED = ("<|system|>\nbe brief\n<|user|>\nhi ✓\n<|assistant|>\nhello ✓</s>\n"
            "<|user|>\nand?\n<|assistant|>\nbye</s>\n")


def test_chat_labels_cover_exactly_the_assistant_turns():
    """The byte tokenizer's template marks assistant turns with {% generation %}: labels are the assistant contents
    and their end-of-sequence tokens, nothing else."""
    ft = finetune_module()
    tokenizer = ft.build_byte_tokenizer()
    assert ft.supports_assistant_mask(tokenizer)
    ids, labels, mode = ft.encode_chat(tokenizer, CONVERSATION)
    assert mode == "markers" and len(ids) == len(labels)
    assert tokenizer.decode(ids) == RENDERED
    assert tokenizer.decode([t for t in labels if t != -100]) == "hello ✓</s>bye</s>"
    assert all(label in (tok, -100) for tok, label in zip(ids, labels))


def test_chat_labels_without_markers_come_from_rendered_prefixes():
    """Without {% generation %} (as in Kimi's template) an assistant turn is what rendering it adds after the
    generation prompt; a template that rewrites earlier turns falls back to learning every token."""
    ft = finetune_module()
    tokenizer = ft.build_byte_tokenizer()
    tokenizer.chat_template = ft.BYTE_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert not ft.supports_assistant_mask(tokenizer)
    ids, labels, mode = ft.encode_chat(tokenizer, CONVERSATION)
    assert mode == "prefixes" and tokenizer.decode(ids) == RENDERED
    # each turn's tokens after "<|assistant|>\n", up to the end of the turn (its newline included)
    assert tokenizer.decode([t for t in labels if t != -100]) == "hello ✓</s>\nbye</s>\n"
    labelled = [i for i, t in enumerate(labels) if t != -100]
    assert all(labels[i] == ids[i] for i in labelled)
    rewriting = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    tokenizer.chat_template = rewriting
    ids, labels, mode = ft.encode_chat(tokenizer, CONVERSATION)
    assert mode == "all" and labels == ids


def test_documents_split_into_blocks(tmp_path):
    ft = finetune_module()
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nstill first\n\n\n  \nsecond\n\nthird\n")
    assert ft.read_records(path) == [{"text": "first doc\nstill first"}, {"text": "second"}, {"text": "third"}]
    assert ft.split_into_blocks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert ft.split_into_blocks(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a lone last token is dropped
    tokenizer = ft.build_byte_tokenizer()
    examples, stats = ft.encode_records(ft.read_records(path), tokenizer, 8, 512, path)
    # "first doc\nstill first" = 21 bytes + eos -> 8 + 8 + 6; "second" + eos = 7; "third" + eos = 6
    assert [len(e["input_ids"]) for e in examples] == [8, 8, 6, 7, 6]
    assert examples[0]["input_ids"] == [3 + b for b in b"first do"] and examples[2]["input_ids"][-1] == 2
    assert stats.documents == 3 and stats.tokens == 35


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl line 2: not valid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n\n{"txt": "x"}\n', "bad.jsonl line 3: needs a 'text' or a 'messages' field"),
        ("bad.jsonl", '{"text": 3}\n', "line 1: field 'text' must be a string"),
        ("bad.jsonl", '["text"]\n', "line 1: expected a JSON object, got list"),
        ("bad.jsonl", '{"messages": [{"role": "user"}]}\n', "line 1: messages[0] needs a string 'content'"),
        ("bad.csv", "a,b\n", "unsupported extension '.csv'"),
        ("empty.txt", "\n\n  \n", "empty.txt: no documents"),
    ],
)
def test_bad_input_files_are_named_in_the_error(tmp_path, name, content, message):
    ft = finetune_module()
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ft.FinetuneError, match=re.escape(message)):
        ft.read_records(path)


def test_failures_leave_no_output_behind(tmp_path, capsys):
    ft = finetune_module()
    corpus = write_corpus(tmp_path / "corpus.txt", docs=4)
    out = tmp_path / "out"
    assert ft.main([*COMMON, "--train-file", str(tmp_path / "missing.txt"), "--output-dir", str(out)]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    # fails after the staging directory exists (unknown LoRA target): it is removed again
    assert ft.main([*COMMON, "--lora", "--lora-targets", "no_such_proj", "--train-file", str(corpus),
                    "--output-dir", str(out)]) == 2
    assert "no_such_proj" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert ft.main([*COMMON, "--train-file", str(corpus), "--output-dir", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"
    # settings native transformers cannot run are refused up front
    for extra, message in ((["--packing"], "needs CUDA with flash-linear-attention"),
                           (["--router-aux-loss-coef", "0.1"], "computes no router balance loss")):
        argv = [*COMMON, "--model-class", "native", *extra, "--train-file", str(corpus), "--output-dir", str(out)]
        assert ft.main([*argv, "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "out"]


def test_model_directories_load_as_ours_and_as_native(tmp_path):
    """``--model DIR`` loads our checkpoint with our class and with native transformers' (same logits while the
    router bias is zero, where both routings agree), and the native model built from the preset's values has the
    parameters of the one loaded from the checkpoint."""
    from transformers import KimiLinearForCausalLM as NativeModel

    ft = finetune_module()
    torch.manual_seed(0)
    saved = KimiLinearForCausalLM(load_preset("tiny")).eval()
    saved.save_pretrained(tmp_path / "ckpt")
    ft.build_byte_tokenizer().save_pretrained(tmp_path / "ckpt")
    argv = ["--model", str(tmp_path / "ckpt"), "--train-file", "x.txt", "--output-dir", str(tmp_path / "o")]
    ours = ft.load_model(ft.parse_args(argv)).eval()
    native = ft.load_model(ft.parse_args([*argv, "--model-class", "native"])).eval()
    assert type(ours) is KimiLinearForCausalLM and type(native) is NativeModel
    assert ft.load_tokenizer(ft.parse_args(argv))("ab", add_special_tokens=False)["input_ids"] == [100, 101]
    x = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = saved(x).logits
        assert torch.equal(ours(x).logits, expected)
        assert (native(x).logits - expected).abs().max() < 1e-4
    from_config = NativeModel(ft.native_config(load_preset("tiny")))
    shapes = {n: tuple(p.shape) for n, p in from_config.state_dict().items()}
    assert shapes == {n: tuple(p.shape) for n, p in native.state_dict().items()}
    assert from_config.config.layer_types == native.config.layer_types
    assert from_config.config.mlp_layer_types == native.config.mlp_layer_types
