"""bench/gpu_scale.py runs end to end on a CPU (tiny preset) and writes the JSON shape issue 17 asks for, with
native transformers' anchor row from the same run."""

import json
import math
import os

import pytest
import torch

from bench import gpu_report
from bench import gpu_scale as scale


def test_gpu_scale_smoke_writes_the_issue_shape(tmp_path):
    scale.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--parts", "decode,batched",
                "--contexts", "256", "--native-contexts", "256", "--batched-contexts", "256", "--batches", "1,2",
                "--new-tokens", "2", "--native-tokens", "2", "--pdl", "off,on", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_scale.json").read_text())
    assert {"device", "versions", "date", "decode", "batched"} <= set(result)
    off, on = result["decode"]  # a row for each programmatic-dependent-launch setting (a no-op on a CPU)
    assert (off["pdl"], on["pdl"]) == (False, True)
    # times are only checked to be numbers: a difference of two short timings can come out negative on a busy CPU
    for row in (off, on):
        assert (row["context"], row["batch"], row["layers"]) == (256, 1, 4) and math.isfinite(row["tpot_ms"])
    (native,) = result["native_decode"]
    assert native["context"] == 256 and math.isfinite(native["tpot_ms"])
    layouts = sorted((r["layout"], r["batch"], r["pdl"]) for r in result["batched"])
    assert layouts == sorted((lay, b, p) for lay in ("hybrid", "all_mla") for b in (1, 2) for p in (False, True))
    assert all(math.isfinite(r["tokens_per_s"]) for r in result["batched"])
    table = (tmp_path / "gpu_scale.md").read_text()
    assert "native transformers" in table and "hybrid / all-MLA" in table
    decode = [line for line in table.splitlines() if line.startswith("| ") and "TPOT" not in line
              and ("native transformers" in line or line.split("|")[1].strip().isdigit())]
    header = next(line for line in table.splitlines() if line.startswith("| layers |"))
    assert decode and all(line.count("|") == header.count("|") for line in decode), (header, decode)


def test_pdl_setting_is_restored_and_bad_values_refused(monkeypatch):
    monkeypatch.delenv("KIMI_LINEAR_PDL", raising=False)
    model = type("M", (), {})()  # no captured graphs to drop
    with gpu_report.programmatic_dependent_launch(model, True):
        assert os.environ["KIMI_LINEAR_PDL"] == "1"
    assert "KIMI_LINEAR_PDL" not in os.environ
    assert gpu_report.pdl_settings("off, on") == [False, True]
    with pytest.raises(ValueError, match="--pdl"):
        gpu_report.pdl_settings("yes")


def test_gpu_scale_int8_rows_beside_bf16(tmp_path):
    """``--weights bf16,int8``: a decode row per weights kind and the table's int8 / bf16 ratio line; an unknown
    kind is refused."""
    pytest.importorskip("torchao")
    scale.main(["--preset", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--parts", "decode", "--contexts", "256",
                "--native-contexts", "", "--new-tokens", "2", "--weights", "bf16,int8", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_scale.json").read_text())
    rows = {r["weights"]: r for r in result["decode"]}
    assert set(rows) == {"bf16", "int8"} and all(math.isfinite(r["tpot_ms"]) for r in rows.values())
    assert "TPOT against bf16 weights in the same run: int8 256:" in (tmp_path / "gpu_scale.md").read_text()
    with pytest.raises(SystemExit):
        scale.main(["--weights", "int4", "--out", str(tmp_path)])


def test_batched_backs_off_from_an_estimated_largest_batch_that_runs_out_of_memory(monkeypatch):
    """The largest-batch estimate leaves the step's activations out: on running out of memory there, the batch
    shrinks by a fifth until it runs (and stays above the next smaller batch asked for); other batches that run
    out of memory are skipped."""
    monkeypatch.setattr(scale, "largest_batch", lambda *args: 20)
    tried = []

    def step_time(model, batch, context, args):
        tried.append(batch)
        if batch > 12:
            raise torch.OutOfMemoryError("pretend")
        return {"step_s": 0.01, "expert_share": 0.5}

    monkeypatch.setattr(scale, "step_time", step_time)
    model = type("M", (), {"device": torch.device("cpu")})()
    args = type("A", (), {"batched_contexts": [256], "batches": [1, 8, "max"], "pdl": [False, True], "prefill": 64,
                              "reserve_gb": 0.0})()
    rows = scale.run_batched(model, "hybrid", args, None, None)
    assert [r["batch"] for r in rows] == [1, 1, 8, 8, 12, 12]
    assert all(r["largest_batch"] == 12 for r in rows)
    assert tried == [1, 1, 8, 8, 20, 16, 12, 12]


@pytest.mark.slow
def test_gpu_scale_cold_start_splits_each_process_into_imports_loading_and_first_token(tmp_path):
    """``--parts cold`` on a CPU: three fresh processes load a saved 2-layer checkpoint and generate a token; each
    row has its total, imports, imports + loading and first-token times, in that order of size."""
    scale.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--parts", "cold", "--cold-layers", "2",
                "--cold-prompt", "16", "--out", str(tmp_path)])
    cold = json.loads((tmp_path / "gpu_scale.json").read_text())["cold_start"]
    for run in ("fresh_without_tuning", "second_process", "fresh_machine"):
        imports, load, first, total = (cold[f"{run}_{part}s"] for part in ("imports_", "load_", "first_token_", ""))
        assert 0 < imports <= load <= total and first >= 0 and abs(load + first - total) < 0.05, (run, cold)
    assert "first token (s)" in (tmp_path / "gpu_scale.md").read_text()


def test_kernel_variants_set_module_constants_for_their_rows_only(tmp_path, monkeypatch):
    """--kernel-variants: each variant's module constants hold inside its rows and are restored after (here a
    constant of a module that imports without triton); an unknown variant is refused by name."""
    from modeling_kimi_linear import kernels

    before = kernels.MULTI_LINEAR_SLOTS
    monkeypatch.setitem(scale.KERNEL_VARIANTS, "test", {("kernels", "MULTI_LINEAR_SLOTS"): before + 1})
    with scale.kernel_variant("test"):
        assert kernels.MULTI_LINEAR_SLOTS == before + 1
    assert kernels.MULTI_LINEAR_SLOTS == before
    with pytest.raises(RuntimeError), scale.kernel_variant("test"):
        raise RuntimeError("a failing row")
    assert kernels.MULTI_LINEAR_SLOTS == before
    scale.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--parts", "decode", "--contexts", "256",
                "--native-contexts", "", "--new-tokens", "2", "--kernel-variants", "default,test",
                "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_scale.json").read_text())["decode"]
    assert [r["kernels"] for r in rows] == ["default", "test"]
    with pytest.raises(SystemExit):
        scale.main(["--device", "cpu", "--kernel-variants", "nosuch", "--out", str(tmp_path)])
