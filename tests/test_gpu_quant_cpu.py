"""bench/gpu_quant.py runs end to end on a CPU (tiny preset): every method loads through ``from_pretrained``,
generates, saves and reloads to the same logits, and takes a LoRA step; torchao int8 stores the experts in int8."""

import importlib.util
import json

import pytest

from bench import gpu_quant


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_gpu_quant_smoke_loads_generates_reloads_and_trains(tmp_path):
    gpu_quant.main(["--device", "cpu", "--preset", "tiny", "--methods", "bf16,int8", "--context", "32",
                    "--steps", "2", "--work", str(tmp_path / "ckpt"), "--out", str(tmp_path)])
    rows = {r["method"]: r for r in json.loads((tmp_path / "gpu_quant.json").read_text())["rows"]}
    assert set(rows) == {"bf16", "int8"}, rows
    for row in rows.values():
        assert "error" not in row, row
        assert row["generate_ok"] and row["reload"] == "same" and row["lora"] == "ok", row
    assert rows["bf16"]["experts_stored_as"] == "Parameter"
    assert rows["int8"]["experts_stored_as"] == "Int8Tensor"
    assert rows["int8"]["greedy_same_as_bf16"].endswith("/3")
    assert not list(tmp_path.glob("ckpt.*")), "the reload check left its checkpoint behind"
    assert "save + reload" in (tmp_path / "gpu_quant.md").read_text()
