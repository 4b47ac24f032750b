"""bench/gpu_scale.py runs end to end on a CPU (tiny preset) and writes the JSON shape issue 17 asks for, with
native transformers' anchor row from the same run."""

import json
import math

from bench import gpu_scale as scale


def test_gpu_scale_smoke_writes_the_issue_shape(tmp_path):
    scale.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--parts", "decode,batched",
                "--contexts", "256", "--native-contexts", "256", "--batched-contexts", "256", "--batches", "1,2",
                "--new-tokens", "2", "--native-tokens", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_scale.json").read_text())
    assert {"device", "versions", "date", "decode", "batched"} <= set(result)
    (row,) = result["decode"]
    # times are only checked to be numbers: a difference of two short timings can come out negative on a busy CPU
    assert (row["context"], row["batch"], row["layers"]) == (256, 1, 4) and math.isfinite(row["tpot_ms"])
    (native,) = result["native_decode"]
    assert native["context"] == 256 and math.isfinite(native["tpot_ms"])
    layouts = {(r["layout"], r["batch"]) for r in result["batched"]}
    assert layouts == {("hybrid", 1), ("hybrid", 2), ("all_mla", 1), ("all_mla", 2)}
    assert all(math.isfinite(r["tokens_per_s"]) for r in result["batched"])
    table = (tmp_path / "gpu_scale.md").read_text()
    assert "native transformers" in table and "hybrid / all-MLA" in table
