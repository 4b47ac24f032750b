"""The ``kimi-linear`` command line: help texts, ``info`` against an actual model and cache, bench delegation, the
embedded demo (generation, and its export as a checkpoint that loads without the package)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_kimi_linear import KimiLinearForCausalLM
from modeling_kimi_linear.cache_kimi_linear import cache_bytes
from modeling_kimi_linear.cli import build_parser, main
from modeling_kimi_linear.presets import load_preset


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["info", "--help"], ["bench", "--help"],
                                  ["demo", "--help"]])
def test_help_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run(["kimi-linear", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "generate" in result.stdout and "convert" in result.stdout


@pytest.mark.parametrize("batch", [1, 3])
def test_cache_bytes_match_a_real_cache(batch):
    """The configuration-derived sizes equal what a cache holds after a forward of that many tokens."""
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(load_preset("tiny")).eval()
    with torch.no_grad():
        cache = model(torch.randint(3, 500, (batch, 29)), use_cache=True).past_key_values
    assert cache_bytes(model.config, 29, batch, element_size=4)["total"] == cache.memory_bytes()
    with torch.no_grad():
        model(torch.randint(3, 500, (batch, 1)), past_key_values=cache, use_cache=True)
    assert cache_bytes(model.config, 30, batch, element_size=4)["total"] == cache.memory_bytes()


def test_info_json_counts_parameters_of_the_built_model(capsys):
    assert main(["info", "tiny", "--json", "--context", "1000", "--dtype", "float32"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = KimiLinearForCausalLM(load_preset("tiny"))
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    cfg = model.config
    # active: everything but the routed experts, plus top-k of them
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = sum(1 for layer in model.model.layers if hasattr(layer, "block_sparse_moe"))
    assert info["active_parameters"] == info["parameters"] - moe_layers * per_expert * (cfg.num_experts - cfg.num_experts_per_token)
    assert info["layer_pattern"] == "KKKM" and (info["kda_layers"], info["mla_layers"]) == (3, 1)
    assert info["cache_bytes_per_token"] == 1 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert info["all_mla_cache_bytes_at_context"] == 4 * 1000 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_info_refuses_an_unknown_target():
    with pytest.raises(SystemExit, match="neither a checkpoint directory"):
        main(["info", "no-such-preset"])


def test_info_refuses_a_directory_without_a_config(tmp_path):
    with pytest.raises(SystemExit, match="without a config.json"):  # transformers would describe the 48B's defaults
        main(["info", str(tmp_path)])


def test_generate_names_the_problem_in_one_line(tmp_path):
    """A missing checkpoint folder, a folder without tokenizer files, --chat without a chat template, and a CUDA
    device where there is none: one SystemExit naming the problem, not a traceback from inside transformers."""
    from modeling_kimi_linear.cli import demo_checkpoint

    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        main(["generate", "--model", str(tmp_path / "nosuch"), "hi"])
    model_only = tmp_path / "model_only"
    KimiLinearForCausalLM(load_preset("tiny")).save_pretrained(model_only)
    with pytest.raises(SystemExit, match="has no tokenizer files.*--tokenizer"):
        main(["generate", "--model", str(model_only), "hi"])
    with pytest.raises(SystemExit, match="--chat needs a tokenizer with a chat template"):
        main(["generate", "--chat", "hi", "--max-new-tokens", "2"])  # the demo's tokenizer has no template
    assert (demo_checkpoint() / "config.json").is_file()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            main(["generate", "--device", "cuda", "hi"])


def test_bench_passes_arguments_to_the_script():
    result = subprocess.run([sys.executable, "-m", "modeling_kimi_linear.cli", "bench", "cpu", "--", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--decode-steps" in result.stdout


def test_generate_with_the_demo_prints_what_the_model_generates(capsys):
    """The command's greedy output equals tokenizer + model.generate run directly on the demo checkpoint."""
    from modeling_kimi_linear import KimiSentencePieceTokenizer
    from modeling_kimi_linear.cli import demo_checkpoint

    prompt = "def add(a, b):\n"
    assert main(["generate", prompt, "--max-new-tokens", "12", "--no-stream", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    path = demo_checkpoint()
    tokenizer = KimiSentencePieceTokenizer.from_pretrained(path)
    model = KimiLinearForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert printed.strip() == tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_the_demo_generates_with_its_cache():
    """The demo's saved configs keep use_cache on (Trainer had left it off, and every generated token re-ran the
    whole sequence): a generate() call builds a KimiLinearCache."""
    from transformers import GenerationConfig

    from modeling_kimi_linear import KimiLinearCache
    from modeling_kimi_linear.cli import demo_checkpoint

    path = demo_checkpoint()
    assert GenerationConfig.from_pretrained(path).use_cache
    model = KimiLinearForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.use_cache
    out = model.generate(torch.tensor([[1, 40, 41]]), max_new_tokens=3, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    cache = out.get("cache", out.get("past_key_values"))
    assert isinstance(cache, KimiLinearCache) and cache.get_seq_length() == 5


def test_info_on_the_demo_checkpoint_reads_its_config(capsys):
    from modeling_kimi_linear import KimiLinearConfig
    from modeling_kimi_linear.cli import demo_checkpoint

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    config = KimiLinearConfig.from_pretrained(demo_checkpoint())
    assert info["layers"] == config.num_hidden_layers and info["mla_layers"] == len(config.mla_layers)


def test_the_demo_checkpoint_holds_no_code():
    """config, weights and tokenizer files only: this package loads it; `kimi-linear demo --export` adds the code."""
    from modeling_kimi_linear.cli import demo_checkpoint

    names = sorted(p.name for p in demo_checkpoint().iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                     "tokenizer_config.json", "train_metrics.json"]


EXPORT_LOADER = r"""
import json, sys
sys.modules["modeling_kimi_linear"] = None  # the installed package must not be importable
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
path, prompt = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
base = AutoModel.from_pretrained(path, trust_remote_code=True)
print(json.dumps({"classes": [type(o).__module__ + "." + type(o).__name__ for o in (tokenizer, model, base)],
                  "tokens": out[0].tolist()}))
"""


def test_demo_export_loads_with_remote_code_without_the_package(tmp_path, capsys):
    """`kimi-linear demo --export DIR` writes a checkpoint that transformers' Auto classes load with
    trust_remote_code in a process where this package cannot be imported, generating what the package generates."""
    from safetensors.torch import load_file

    from modeling_kimi_linear import KimiSentencePieceTokenizer
    from modeling_kimi_linear.cli import demo_checkpoint

    dst = tmp_path / "export" / "demo"
    assert main(["demo", "--export", str(dst)]) == 0
    assert str(dst) in capsys.readouterr().out
    assert [p.name for p in dst.parent.iterdir()] == ["demo"]  # nothing temporary left beside it
    files = {p.name for p in dst.iterdir()}
    assert {"modeling_kimi_linear.py", "configuration_kimi_linear.py", "tokenization_kimi_sp.py",
            "atomic_write.py", "train_metrics.json"} <= files
    umask = os.umask(0)
    os.umask(umask)
    assert {(dst / name).stat().st_mode & 0o777 for name in files} == {0o666 & ~umask}
    auto_map = json.loads((dst / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_kimi_linear.KimiLinearForCausalLM"
    assert json.loads((dst / "tokenizer_config.json").read_text())["auto_map"] == {
        "AutoTokenizer": ["tokenization_kimi_sp.KimiSentencePieceTokenizer", None]}
    src = demo_checkpoint()
    original, exported = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(original[k].dtype == exported[k].dtype and torch.equal(original[k], exported[k]) for k in original)

    prompt = "def add(a, b):\n"
    tokenizer = KimiSentencePieceTokenizer.from_pretrained(src)
    model = KimiLinearForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model.generate(tokenizer(prompt, return_tensors="pt")["input_ids"], max_new_tokens=8,
                                  min_new_tokens=8, do_sample=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", EXPORT_LOADER, str(dst), prompt], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(name.startswith("transformers_modules.") for name in got["classes"])
    assert [name.rsplit(".", 1)[1] for name in got["classes"]] == [
        "KimiSentencePieceTokenizer", "KimiLinearForCausalLM", "KimiLinearModel"]
    assert got["tokens"] == expected[0].tolist()

    # an existing directory is refused, one line, nothing changed
    assert main(["demo", "--export", str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name for p in dst.iterdir()} == files
