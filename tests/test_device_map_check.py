"""examples/multi_gpu/device_map_check.py without GPUs: the one-device run end to end on the CPU (random checkpoint
saved and loaded, logits, greedy tokens, TPOT rows), the layer cut of a preset, and the comparison it decides by."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import load_script
from modeling_kimi_linear import KimiLinearForCausalLM

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "multi_gpu" / "device_map_check.py"


def check_module():
    return load_script(SCRIPT, "device_map_check_example")


def test_single_run_on_the_cpu(tmp_path):
    out, checkpoint = tmp_path / "summary.json", tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--runs", "single", "--prompt-len", "8",
                           "--new-tokens", "3", "--contexts", "16", "--steps", "2", "--checkpoint", str(checkpoint),
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(out.read_text())
    run = summary["runs"]["single"]
    assert run["placement_warnings"] == [] and [r["context"] for r in run["tpot"]] == [16]
    assert run["tpot"][0]["tpot_ms"] > 0
    # the saved random checkpoint is the released layout, and greedy decoding of it gives the tokens reported
    model = KimiLinearForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    prompt = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=3, do_sample=False)[:, 8:]
    assert tokens.tolist() == summary["greedy_tokens"]["single"]


def test_layer_cut_keeps_the_hybrid_pattern():
    config = check_module().preset_config("kimi_linear_48b_a3b", 8)
    assert config.num_hidden_layers == 8 and config.hidden_size == 2304 and config.num_experts == 256
    assert "".join("K" if t == "linear_attention" else "M" for t in config.layer_types) == "KKKMKKKM"


def test_comparison():
    module = check_module()
    logits = torch.zeros(2, 3, 5)
    single = {"tokens": torch.tensor([[1, 2, 3, 4]]), "logits": logits,
              "tpot": [{"context": 4096, "tpot_ms": 2.0}, {"context": 131072, "tpot_ms": 4.0}]}
    split = {"tokens": torch.tensor([[1, 2, 9, 4]]), "logits": logits + 0.25,
             "tpot": [{"context": 4096, "tpot_ms": 3.0}, {"context": 131072, "tpot_ms": 4.0}]}
    got = module.compare(single, split)
    assert got["generated_tokens_equal"] is False and got["first_differing_position"] == 2
    assert got["max_abs_logit_diff"] == 0.25 and got["tpot_split_over_single"] == {4096: 1.5, 131072: 1.0}
    assert module.compare(single, single)["generated_tokens_equal"] is True
