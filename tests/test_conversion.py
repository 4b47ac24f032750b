"""conversion/ scripts: released -> ours -> released, self-contained output, streaming memory, bad input.

Released-layout sources are built here: a random native transformers model saved with the released tensor names
(conftest.to_released_dir), a config.json written with Moonshot's keys and auto_map (reference_model.md §1.1),
bf16 weights with fp32 A_log / dt_bias like the release, tiktoken-style tokenizer files. Outputs are read back
with the safetensors library (not with the converter's own reader) and compared with the source tensors.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import KDA, MLA, make_native_model, to_released_dir
from kimi_linear_conversion import checkpoint_io
from kimi_linear_conversion.convert_released_checkpoint import main as convert_main
from kimi_linear_conversion.export_released_checkpoint import main as export_main

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "modeling_kimi_linear"

MOONSHOT_AUTO_MAP = {
    "AutoConfig": "configuration_kimi.KimiLinearConfig",
    "AutoModel": "modeling_kimi.KimiLinearModel",
    "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
}
OUR_AUTO_MAP = {
    "AutoConfig": "configuration_kimi_linear.KimiLinearConfig",
    "AutoModel": "modeling_kimi_linear.KimiLinearModel",
    "AutoModelForCausalLM": "modeling_kimi_linear.KimiLinearForCausalLM",
}
MOONSHOT_TOKENIZER_CONFIG = {
    "tokenizer_class": "TikTokenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
    "model_max_length": 1048576,
    "added_tokens_decoder": {"256": {"content": "[BOS]", "special": True},
                             "257": {"content": "[EOS]", "special": True}},
}
MOONSHOT_CODE = {  # stand-ins for the release's remote code: never copied into our checkpoints
    "modeling_kimi.py": "raise ImportError('released modeling code stand-in')\n",
    "configuration_kimi.py": "raise ImportError('released configuration code stand-in')\n",
    "tokenization_kimi.py": "raise ImportError('released tokenizer code stand-in')\n",
}


# ---------------------------------------------------------------------------------------------------- builders
def moonshot_config(native: dict, dtype: str) -> dict:
    """The released config.json keys (reference_model.md §1.1) for the toy model."""
    n, types = native["num_hidden_layers"], native["layer_types"]
    return {
        "architectures": ["KimiLinearForCausalLM"], "auto_map": dict(MOONSHOT_AUTO_MAP), "model_type": "kimi_linear",
        "vocab_size": native["vocab_size"], "hidden_size": native["hidden_size"], "num_hidden_layers": n,
        "intermediate_size": native["intermediate_size"], "hidden_act": "silu",
        "head_dim": native["hidden_size"] // native["num_attention_heads"],
        "num_attention_heads": native["num_attention_heads"], "num_key_value_heads": native["num_key_value_heads"],
        "q_lora_rank": None, "kv_lora_rank": native["kv_lora_rank"], "qk_nope_head_dim": native["qk_nope_head_dim"],
        "qk_rope_head_dim": native["qk_rope_head_dim"], "v_head_dim": native["v_head_dim"], "mla_use_nope": True,
        "rope_theta": 10000.0, "rope_scaling": None, "model_max_length": 1048576,
        "linear_attn_config": {
            "full_attn_layers": [i + 1 for i in range(n) if types[i] == MLA],
            "kda_layers": [i + 1 for i in range(n) if types[i] == KDA],
            "head_dim": native["linear_head_dim"], "num_heads": native["linear_num_heads"],
            "short_conv_kernel_size": native["linear_conv_kernel_dim"],
        },
        "num_experts": native["num_experts"], "num_experts_per_token": native["num_experts_per_token"],
        "moe_intermediate_size": native["moe_intermediate_size"], "num_shared_experts": 1,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "moe_router_activation_func": "sigmoid",
        "moe_renormalize": True, "routed_scaling_factor": 2.446, "use_grouped_topk": True, "num_expert_group": 1,
        "topk_group": 1, "num_nextn_predict_layers": 0, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
        "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "dtype": dtype, "transformers_version": "4.57.0",
    }


@pytest.fixture(scope="module")
def native_source(tmp_path_factory) -> tuple:
    """(native model, its native save dir, its released-name tensors) built once for the module."""
    base = tmp_path_factory.mktemp("native_source")
    model = make_native_model()
    model.save_pretrained(base / "native")
    released = to_released_dir(base / "native", base / "released")
    with safe_open(str(released / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return model, base / "native", tensors


def _is_fp32_param(name: str) -> bool:
    return name.endswith(("A_log", "dt_bias"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Write with the safetensors library: one model.safetensors, or ``shards`` files + a hand-made index."""
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def make_released(path: Path, native_source, shards: int = 1, dtype: str = "bfloat16") -> Path:
    """A released-layout directory like moonshotai/Kimi-Linear-48B-A3B-*: Moonshot config, bf16 weights with
    fp32 A_log / dt_bias, tiktoken tokenizer files, the release's .py files (stand-ins), licence, generation
    config."""
    model, native_dir, tensors = native_source
    path.mkdir(parents=True)
    torch_dtype = getattr(torch, dtype)
    cast = {k: (v if _is_fp32_param(k) else v.to(torch_dtype)).contiguous() for k, v in tensors.items()}
    write_tensors(path, cast, shards)
    native_cfg = json.loads((native_dir / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(moonshot_config(native_cfg, dtype), indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3],
                                                             "do_sample": False, "max_length": 77}))
    ranks = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    (path / "tiktoken.model").write_text(ranks)
    (path / "tokenizer_config.json").write_text(json.dumps(MOONSHOT_TOKENIZER_CONFIG, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "[BOS]", "eos_token": "[EOS]"}))
    (path / "chat_template.jinja").write_text("{% for m in messages %}<|im_user|>{{ m.content }}<|im_end|>{% endfor %}")
    (path / "LICENSE").write_text("modified MIT (stand-in)\n")
    for name, text in MOONSHOT_CODE.items():
        (path / name).write_text(text)
    return path


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint dir, read with the safetensors library."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    out = {}
    for file in files:
        with safe_open(str(path / file), "pt") as f:
            for k in f.keys():
                assert k not in out, k
                out[k] = f.get_tensor(k)
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(torch.uint8), v.contiguous().view(torch.uint8)), k  # bit-exact


def saved_code_files(tmp_path: Path) -> set[str]:
    """The .py files our save_pretrained copies next to the weights."""
    from modeling_kimi_linear import KimiLinearForCausalLM
    from modeling_kimi_linear.presets import load_preset

    KimiLinearForCausalLM(load_preset("tiny")).save_pretrained(tmp_path / "saved_by_us")
    return {p.name for p in (tmp_path / "saved_by_us").glob("*.py")}


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------------------------------------------- convert
@pytest.mark.parametrize("shards", [1, 3])
def test_convert_released(tmp_path, native_source, capsys, shards):
    src = make_released(tmp_path / "released", native_source, shards=shards)
    dst = tmp_path / "ours"
    assert convert_main([str(src), str(dst), "--verify"]) == 0
    out = capsys.readouterr().out

    src_tensors = read_all(src)
    assert_same_tensors(read_all(dst), src_tensors)
    n_params = sum(t.numel() for t in src_tensors.values())
    assert f"{len(src_tensors):,} tensors" in out and f"{n_params:,} parameters" in out and "verified" in out

    cfg, released_cfg = json.loads((dst / "config.json").read_text()), json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "kimi_linear" and cfg["auto_map"] == OUR_AUTO_MAP
    for key, value in released_cfg.items():
        if key not in ("auto_map", "transformers_version", "rope_scaling"):
            assert cfg[key] == value, key
    # the package's modules, exactly the set save_pretrained copies; none of the release's code
    py_files = {p.name for p in dst.glob("*.py")}
    tokenizer_code = set()
    if (PACKAGE / "tokenization_kimi.py").is_file():  # the tokenizer module and the sibling it imports
        tokenizer_code = {"tokenization_kimi.py", "atomic_write.py"}
    assert py_files == saved_code_files(tmp_path) | tokenizer_code
    for name in py_files:
        assert (dst / name).read_bytes() == (PACKAGE / name).read_bytes(), name
    assert not {"modeling_kimi.py", "configuration_kimi.py"} & py_files
    # tokenizer: same files, our class
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "KimiTokenizer"
    assert tok["auto_map"] == {"AutoTokenizer": ["tokenization_kimi.KimiTokenizer", None]}
    assert {k: v for k, v in tok.items() if k not in ("tokenizer_class", "auto_map")} == \
        {k: v for k, v in MOONSHOT_TOKENIZER_CONFIG.items() if k not in ("tokenizer_class", "auto_map")}
    for name in ("tiktoken.model", "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
                 "LICENSE"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_converted_tokenizer_json(tmp_path, native_source, monkeypatch):
    """The conversion writes a tokenizer.json built from the rank file; a load from DST reads it (the rank
    converter is not called) and encodes / decodes as a tokenizer built from the release's files alone."""
    from modeling_kimi_linear import tokenization_kimi
    from modeling_kimi_linear.tokenization_kimi import KimiTokenizer

    src = make_released(tmp_path / "released", native_source)
    dst = tmp_path / "ours"
    assert convert_main([str(src), str(dst)]) == 0
    assert json.loads((dst / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    text = "Hello<|im_user|> wörld 123 [EOS]\n"
    from_ranks = KimiTokenizer.from_pretrained(src)  # the release's tiktoken.model + tokenizer_config.json
    assert not (src / "tokenizer.json").exists()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the rank file was converted again")

    monkeypatch.setattr(tokenization_kimi, "_KimiRankFileConverter", no_conversion)
    from_json = KimiTokenizer.from_pretrained(dst)
    ids = from_ranks(text)["input_ids"]
    assert from_json(text)["input_ids"] == ids and len(ids) > 1
    assert from_json.decode(ids) == from_ranks.decode(ids) == text
    assert len(from_json) == len(from_ranks)


def test_sentencepiece_tokenizer_files(tmp_path, native_source):
    """Our own small models carry a sentencepiece tokenizer.model: it is copied and named
    KimiSentencePieceTokenizer (tokenization_kimi_sp)."""
    src = make_released(tmp_path / "released", native_source)
    (src / "tiktoken.model").unlink()
    (src / "tokenizer.model").write_bytes(b"\x0a\x05sp-model-stand-in")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>"}))
    dst = tmp_path / "ours"
    assert convert_main([str(src), str(dst)]) == 0
    assert (dst / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert json.loads((dst / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "KimiSentencePieceTokenizer", "bos_token": "<s>",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi_sp.KimiSentencePieceTokenizer", None]},
    }
    assert (dst / "tokenization_kimi_sp.py").is_file() == (PACKAGE / "tokenization_kimi_sp.py").is_file()
    assert not (dst / "tokenization_kimi.py").exists() or (PACKAGE / "tokenization_kimi.py").is_file()


def test_multishard_output_and_index(tmp_path, native_source):
    src = make_released(tmp_path / "released", native_source)
    dst = tmp_path / "ours"
    max_shard = 40_000
    assert convert_main([str(src), str(dst), "--max-shard-size", "40KB"]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert not (dst / "model.safetensors").exists()
    src_tensors = read_all(src)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src_tensors.values())
    assert set(index["weight_map"]) == set(src_tensors)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in dst.glob("model-*-of-*.safetensors"))
    for file in files:
        with safe_open(str(dst / file), "pt") as f:
            held = {k: f.get_tensor(k) for k in f.keys()}
        assert set(held) == {k for k, v in index["weight_map"].items() if v == file}
        data = sum(t.numel() * t.element_size() for t in held.values())
        assert data <= max_shard or len(held) == 1, file
    assert_same_tensors(read_all(dst), src_tensors)


def test_dtype_cast_keeps_gate_parameters_fp32(tmp_path, native_source):
    src = make_released(tmp_path / "released", native_source, dtype="float32")
    dst = tmp_path / "ours"
    assert convert_main([str(src), str(dst), "--dtype", "float16", "--verify"]) == 0
    src_tensors, dst_tensors = read_all(src), read_all(dst)
    assert set(dst_tensors) == set(src_tensors)
    for k, v in src_tensors.items():
        want = v if _is_fp32_param(k) else v.to(torch.float16)
        assert dst_tensors[k].dtype == want.dtype and torch.equal(dst_tensors[k], want), k
    assert any(_is_fp32_param(k) for k in src_tensors)
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"


def test_native_saved_source(tmp_path, native_source):
    from modeling_kimi_linear import KimiLinearForCausalLM

    model, native_dir, _ = native_source
    dst = tmp_path / "ours"
    assert convert_main([str(native_dir), str(dst)]) == 0
    native_tensors, dst_tensors = read_all(native_dir), read_all(dst)
    renamed = {k.replace("layers.0.block_sparse_moe.", "layers.0.mlp."): v for k, v in native_tensors.items()}
    assert "model.layers.0.mlp.gate_proj.weight" in dst_tensors
    assert_same_tensors(dst_tensors, renamed)
    assert "linear_attn_config" in json.loads((dst / "config.json").read_text())
    ours = KimiLinearForCausalLM.from_pretrained(dst).eval()
    assert (_logits(ours) - _logits(model)).abs().max().item() <= 1e-4


LOADER = r"""
import json, os, sys
sys.modules["modeling_kimi_linear"] = None  # the installed package must not be importable
import torch
from transformers import AutoConfig, AutoModelForCausalLM
path, prompt = sys.argv[1], json.loads(sys.argv[2])
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
tokenizer = None
if os.path.exists(os.path.join(path, "tokenization_kimi.py")):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    tokenizer = type(tok).__module__ + "." + type(tok).__name__
print(json.dumps({"module": type(model).__module__, "config": type(config).__module__, "tokens": out[0].tolist(),
                  "tokenizer": tokenizer}))
"""


def test_converted_checkpoint_loads_as_remote_code(tmp_path, native_source):
    from modeling_kimi_linear import KimiLinearForCausalLM

    src = make_released(tmp_path / "released", native_source, dtype="float32")
    dst = tmp_path / "ours"
    assert convert_main([str(src), str(dst), "--max-shard-size", "200KB"]) == 0
    prompt = [5, 6, 7, 8, 9]
    installed = KimiLinearForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = installed.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", LOADER, str(dst), json.dumps(prompt)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules.") and got["config"].startswith("transformers_modules.")
    assert got["tokens"] == expected[0].tolist()
    if (dst / "tokenization_kimi.py").is_file():  # once modeling_kimi_linear ships the tokenizer
        assert got["tokenizer"].startswith("transformers_modules.") and got["tokenizer"].endswith(".KimiTokenizer")


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_released_ours_released(tmp_path, native_source, shards):
    src = make_released(tmp_path / "released", native_source, shards=shards)
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert convert_main([str(src), str(ours), "--max-shard-size", "100KB"]) == 0
    assert export_main([str(ours), str(back), "--verify", "--max-shard-size", "5GB" if shards == 1 else "300KB"]) == 0
    assert_same_tensors(read_all(back), read_all(src))
    assert (back / "model.safetensors").is_file() == (shards == 1)
    original, exported = (json.loads((d / "config.json").read_text()) for d in (src, back))
    assert exported.pop("transformers_version") and original.pop("transformers_version")
    assert exported == original  # every Moonshot field, Moonshot's auto_map, nothing of ours
    assert json.loads((back / "tokenizer_config.json").read_text()) == MOONSHOT_TOKENIZER_CONFIG
    for name in ("tiktoken.model", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes(), name
    assert not list(back.glob("*.py"))


def test_export_loads_in_native_transformers(tmp_path, native_source):
    from transformers import KimiLinearForCausalLM as NativeModel

    from modeling_kimi_linear import KimiLinearForCausalLM

    src = make_released(tmp_path / "released", native_source, dtype="float32")
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert convert_main([str(src), str(ours)]) == 0
    assert export_main([str(ours), str(back), "--remote-code-from", str(src)]) == 0
    assert {p.name for p in back.glob("*.py")} == set(MOONSHOT_CODE)
    native = NativeModel.from_pretrained(back, dtype=torch.float32).eval()
    assert type(native).__module__.startswith("transformers.models.kimi_linear")
    mine = KimiLinearForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    assert (_logits(native) - _logits(mine)).abs().max().item() <= 1e-4


def test_script_entry_points(tmp_path, native_source):
    src = make_released(tmp_path / "released", native_source)
    help_run = subprocess.run([sys.executable, str(REPO / "conversion" / "export_released_checkpoint.py"), "--help"],
                              capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0
    assert "--max-shard-size" in help_run.stdout and "--remote-code-from" in help_run.stdout
    run = subprocess.run([sys.executable, str(REPO / "conversion" / "convert_released_checkpoint.py"), str(src),
                          str(tmp_path / "ours"), "--verify"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert_same_tensors(read_all(tmp_path / "ours"), read_all(src))
    from modeling_kimi_linear.cli import main as cli_main

    assert cli_main(["export", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert_same_tensors(read_all(tmp_path / "back"), read_all(src))


def test_overwrite(tmp_path, native_source, capsys):
    src = make_released(tmp_path / "released", native_source)
    dst = tmp_path / "ours"
    dst.mkdir()
    (dst / "old.txt").write_text("previous content")
    assert convert_main([str(src), str(dst), "--overwrite"]) == 0
    assert not (dst / "old.txt").exists() and (dst / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert convert_main([str(src), str(src), "--overwrite"]) == 1  # would destroy the source
    assert "outside the source" in capsys.readouterr().err and (src / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------- streaming
def test_chunked_copy_smaller_than_tensors(tmp_path, native_source):
    """A memory budget far below the largest tensor still copies bit-exactly (many chunks per tensor), into
    many shards."""
    from kimi_linear_conversion.convert_released_checkpoint import convert_checkpoint

    src = make_released(tmp_path / "released", native_source, shards=2)
    largest = max(t.numel() * t.element_size() for t in read_all(src).values())
    budget = 32 * 1024
    assert largest > 4 * checkpoint_io.chunk_elements(budget) * 2  # several chunks per bf16 tensor
    summary = convert_checkpoint(src, tmp_path / "ours", max_shard_size="30KB", memory_budget_bytes=budget,
                                 verify=True, dtype="float32")
    assert len(summary.shards) > 5 and summary.verified
    src_tensors = read_all(src)
    for k, v in read_all(tmp_path / "ours").items():
        assert v.dtype == torch.float32 and torch.equal(v, src_tensors[k].float()), k


def test_verify_detects_a_changed_byte(tmp_path, native_source):
    src = make_released(tmp_path / "released", native_source)
    entries = checkpoint_io.scan_checkpoint(src)
    tensors = [checkpoint_io.OutTensor(name, entry, entry.dtype) for name, entry in sorted(entries.items())]
    out = tmp_path / "out"
    out.mkdir()
    chunk = checkpoint_io.chunk_elements(10**6)
    checkpoint_io.write_shards(tensors, out, 10**9, chunk)
    checkpoint_io.verify_checkpoint(out, tensors, chunk)  # as written: passes
    raw = bytearray((out / "model.safetensors").read_bytes())
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    begin, end = header["model.norm.weight"]["data_offsets"]
    raw[8 + length + (begin + end) // 2] ^= 0x01
    (out / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(checkpoint_io.CheckpointError, match="'model.norm.weight'"):
        checkpoint_io.verify_checkpoint(out, tensors, chunk)


@pytest.mark.parametrize(("text", "value"), [("5GB", 5 * 10**9), ("4GiB", 4 * 2**30), ("500MB", 500 * 10**6),
                                             ("64KiB", 65536), ("1.5kb", 1500), ("123", 123)])
def test_parse_size(text, value):
    assert checkpoint_io.parse_size(text) == value


@pytest.mark.parametrize("text", ["5XB", "GB", "-1GB", "0", "4iB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        checkpoint_io.parse_size(text)


MEMORY_DRIVER = r"""
import json, resource, sys
import psutil, torch, transformers, safetensors, tqdm  # imported before the baseline
import modeling_kimi_linear
from kimi_linear_conversion.convert_released_checkpoint import convert_checkpoint
src, dst = sys.argv[1], sys.argv[2]
base = psutil.Process().memory_info().rss
summary = convert_checkpoint(src, dst, dtype="bfloat16", max_shard_size="400MB", verify=True,
                             check_against_config=False)
# VmHWM is the peak of this process image; ru_maxrss can start from the parent's peak (vfork + exec)
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024 if "VmHWM:" in status else \
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "tensors": summary.tensors, "shards": len(summary.shards)}))
"""


@pytest.mark.slow
def test_peak_memory_is_bounded(tmp_path):
    """~1.5 GB of 64 MiB fp32 tensors (generic names, key checks bypassed with check_against_config=False):
    the converter's peak RSS grows by less than 2 x largest tensor + 300 MB over its baseline."""
    src = tmp_path / "big"
    src.mkdir()
    shutil.copyfile(REPO / "configuration" / "tiny.json", src / "config.json")
    numel, per_file, files = 16 * 1024 * 1024, 8, 3
    weight_map = {}
    for i in range(files):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {f"blob.{i}.{j}": torch.arange(numel, dtype=torch.float32) + (i * per_file + j) for j in range(per_file)}
        save_file(part, str(src / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        del part
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    largest = numel * 4
    total = largest * per_file * files
    assert total > 2 * largest + 1024**3  # bigger than the budget

    start = time.time()
    result = subprocess.run([sys.executable, "-c", MEMORY_DRIVER, str(src), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["tensors"] == per_file * files and got["shards"] >= 2
    growth = got["peak"] - got["base"]
    assert growth < 2 * largest + 300 * 1024**2, (growth, time.time() - start)
    weight_map = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("blob.0.0", "blob.2.7"):
        with safe_open(str(tmp_path / "out" / weight_map[name]), "pt") as f:
            i, j = map(int, name.split(".")[1:])
            want = (torch.arange(numel, dtype=torch.float32) + (i * per_file + j)).to(torch.bfloat16)
            assert torch.equal(f.get_tensor(name), want)


# ---------------------------------------------------------------------------------------------------- bad input
def _rewrite_single(src: Path, edit) -> None:
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _shard(src: Path, i: int) -> Path:
    return src / f"model-{i:05d}-of-00003.safetensors"


def bad_missing_shard(src, dst, monkeypatch):
    _shard(src, 2).unlink()
    return [], ["model-00002-of-00003.safetensors", "missing"]


def bad_truncated(src, dst, monkeypatch):
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return [], ["model.safetensors", "truncated"]


def bad_corrupt_header(src, dst, monkeypatch):
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00\xff garbage that is not JSON \x01\x02"
    path.write_bytes(bytes(data))
    return [], ["model.safetensors", "corrupt"]


def bad_index_names_absent_tensor(src, dst, monkeypatch):
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.norm.weight"
    holder = index["weight_map"][name]
    index["weight_map"][name] = next(f for f in sorted(set(index["weight_map"].values())) if f != holder)
    index_path.write_text(json.dumps(index))
    return [], ["'model.norm.weight'", index["weight_map"][name], "does not hold it"]


def bad_unexpected_key(src, dst, monkeypatch):
    _rewrite_single(src, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    return [], ["unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"]


def bad_missing_key(src, dst, monkeypatch):
    _rewrite_single(src, lambda t: t.pop("model.layers.2.block_sparse_moe.experts.3.w2.weight"))
    return [], ["missing tensor 'model.layers.2.block_sparse_moe.experts.3.w2.weight'"]


def bad_shape(src, dst, monkeypatch):
    _rewrite_single(src, lambda t: t.__setitem__("model.layers.1.self_attn.o_norm.weight", torch.ones(17)))
    return [], ["'model.layers.1.self_attn.o_norm.weight'", "shape [17]", "[16]"]


def bad_config_field(src, dst, monkeypatch):
    cfg = json.loads((src / "config.json").read_text())
    cfg["linear_attn_config"]["kda_layers"] = [1, 2, 3, 9]
    (src / "config.json").write_text(json.dumps(cfg))
    return [], ["config.json", "kda_layers"]


def bad_int_dtype(src, dst, monkeypatch):
    _rewrite_single(src, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    return [], ["'model.norm.weight'", "I32"]


def bad_pickle(src, dst, monkeypatch):
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    torch.save(tensors, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    PICKLE_CALLS.clear()

    def trap(*args, **kwargs):
        PICKLE_CALLS.append(args)
        raise AssertionError("pickle data must never be loaded")

    for owner, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, attr, trap)
    return [], ["pytorch_model.bin", "pickle", "never opened"]


PICKLE_CALLS: list = []


def bad_dst_exists(src, dst, monkeypatch):
    dst.mkdir(parents=True)
    (dst / "keep.txt").write_text("untouched")
    return [], [str(dst), "already exists", "--overwrite"]


def bad_dst_is_a_file(src, dst, monkeypatch):
    dst.parent.mkdir(parents=True)
    dst.write_text("a file, not a checkpoint")
    return ["--overwrite"], [str(dst), "is not a directory"]


def bad_quantized(src, dst, monkeypatch):
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "torchao", "quant_type": {"default": "Int8WeightOnlyConfig"}}
    (src / "config.json").write_text(json.dumps(config))
    return [], ["config.json", "a quantized checkpoint (torchao)"]


def bad_disk_full(src, dst, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    return ["--verify"], ["not enough disk space", str(dst)]


BAD_CASES = {
    "missing_shard": (3, bad_missing_shard),
    "truncated_file": (1, bad_truncated),
    "corrupt_header": (1, bad_corrupt_header),
    "index_names_absent_tensor": (3, bad_index_names_absent_tensor),
    "unexpected_key": (1, bad_unexpected_key),
    "missing_key": (1, bad_missing_key),
    "shape_vs_config": (1, bad_shape),
    "config_field": (1, bad_config_field),
    "int_dtype": (1, bad_int_dtype),
    "pickle_bin": (1, bad_pickle),
    "dst_exists": (1, bad_dst_exists),
    "dst_is_a_file": (1, bad_dst_is_a_file),
    "quantized": (1, bad_quantized),
    "disk_full": (1, bad_disk_full),
}


# the export shares the source checks with convert: a few cases run through it as well
EXPORT_CASES = ("missing_shard", "truncated_file", "shape_vs_config", "pickle_bin", "dst_exists", "dst_is_a_file",
                "quantized", "disk_full")


@pytest.mark.parametrize(("script", "case"),
                         [("convert", c) for c in BAD_CASES] + [("export", c) for c in EXPORT_CASES])
def test_bad_input(tmp_path, native_source, capsys, monkeypatch, case, script):
    shards, setup = BAD_CASES[case]
    src = make_released(tmp_path / "released", native_source, shards=shards)
    dst = tmp_path / "out" / "dst"
    extra, fragments = setup(src, dst, monkeypatch)
    main = convert_main if script == "convert" else export_main
    assert main([str(src), str(dst), *extra]) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    if case == "dst_exists":
        assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    elif case == "dst_is_a_file":
        assert dst.read_text() == "a file, not a checkpoint"
    else:
        assert not dst.exists()
    parent = dst.parent
    assert not parent.exists() or [p.name for p in parent.iterdir() if p.name != "dst"] == []
    if case == "pickle_bin":
        assert PICKLE_CALLS == []


def test_export_refuses_a_per_head_gate_model(tmp_path, capsys):
    """A Gated DeltaNet-style model (kda_gate_granularity="head") has no released layout: one error, no output."""
    from modeling_kimi_linear import KimiLinearForCausalLM
    from modeling_kimi_linear.presets import load_preset

    torch.manual_seed(0)
    src, dst = tmp_path / "head_gate", tmp_path / "out"
    KimiLinearForCausalLM(load_preset("tiny", kda_gate_granularity="head")).save_pretrained(src)
    assert export_main([str(src), str(dst)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "kda_gate_granularity='head'" in errors[0]
    assert not dst.exists()
