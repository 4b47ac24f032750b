"""FLA path vs PyTorch path on the same random weights (GPU, bf16).

Checks prefill logits, decode logits after a prefill, a left-padded batch, gradients, and the bare KDA op at
full head width, each as a relative error ``||fla - torch|| / ||torch||`` against the 1e-2 target. Prints a
markdown table and writes it (plus JSON) under ``--out``.

    python bench/gpu_check.py --out results/
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.kda_fla import fla_kda_ops  # noqa: E402
from modeling_kimi_linear.kda_torch import kda_chunk_torch  # noqa: E402

TARGET = 1e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_config(moe: bool) -> KimiLinearConfig:
    """4 layers (3 KDA + 1 MLA) at the release's head widths, small everything else. Without ``moe`` every layer
    has a dense MLP: routed top-k is discrete, so bf16 rounding differences that flip one expert choice change a
    logit by O(1) and would hide the KDA kernels' agreement that this script measures."""
    return KimiLinearConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": 128, "num_heads": 8,
                            "short_conv_kernel_size": 4},
        num_experts=16 if moe else None, num_experts_per_token=4, moe_intermediate_size=512, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )


def pair(dtype: torch.dtype, moe: bool = False) -> tuple[KimiLinearForCausalLM, KimiLinearForCausalLM]:
    torch.manual_seed(0)
    cfg = check_config(moe)
    ref = KimiLinearForCausalLM(cfg).to("cuda", dtype)
    fla = copy.deepcopy(ref)
    ref.config.kda_backend = "torch"
    fla.config.kda_backend = "fla"
    for m, backend in ((ref, "torch"), (fla, "fla")):
        for layer in m.model.layers:
            if hasattr(layer.self_attn, "backend"):
                layer.self_attn.backend = backend
    return ref.eval(), fla.eval()


@torch.no_grad()
def prefill_and_decode(ref, fla, rows: list[dict], tag: str = "") -> None:
    ids = torch.randint(3, 4096, (2, 1000), device="cuda")
    a, b = fla(ids, use_cache=True), ref(ids, use_cache=True)
    rows.append({"check": f"{tag}prefill logits (B=2, T=1000)", "rel_err": rel(a.logits, b.logits)})
    ca, cb = a.past_key_values, b.past_key_values
    worst = 0.0
    nxt = b.logits[:, -1:].argmax(-1)
    for _ in range(32):
        a, b = fla(nxt, past_key_values=ca), ref(nxt, past_key_values=cb)
        worst = max(worst, rel(a.logits, b.logits))
        nxt = b.logits[:, -1:].argmax(-1)
    rows.append({"check": f"{tag}decode logits, 32 steps after prefill (worst step)", "rel_err": worst})
    states = [rel(ca.kda_state(i)[1], cb.kda_state(i)[1]) for i in ref.config.kda_layers]
    rows.append({"check": f"{tag}KDA recurrent states after decode (worst layer)", "rel_err": max(states)})


@torch.no_grad()
def padded_batch(ref, fla, rows: list[dict]) -> None:
    ids = torch.randint(3, 4096, (3, 300), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :117] = 0
    mask[2, :250] = 0
    a = fla(ids, attention_mask=mask, use_cache=False).logits
    b = ref(ids, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    rows.append({"check": "left-padded batch logits (valid positions)", "rel_err": rel(a[valid], b[valid])})
    alone = ref(ids[2:, 250:], use_cache=False).logits
    rows.append({"check": "padded row vs the row alone (torch path)", "rel_err": rel(b[2, 250:], alone[0])})


def gradients(ref, fla, rows: list[dict]) -> None:
    ids = torch.randint(3, 4096, (2, 512), device="cuda")
    for m in (ref, fla):
        m.train()
        m.zero_grad(set_to_none=True)
        m(ids, labels=ids, use_cache=False).loss.backward()
        m.eval()
    worst, where = 0.0, ""
    for (name, pa), (_, pb) in zip(fla.named_parameters(), ref.named_parameters()):
        if pb.grad is None or "self_attn" not in name:
            continue
        err = rel(pa.grad, pb.grad)
        if err > worst:
            worst, where = err, name
    rows.append({"check": f"gradients of attention parameters (worst: {where})", "rel_err": worst})


def bare_op(rows: list[dict]) -> None:
    chunk_kda, fused_recurrent_kda = fla_kda_ops()
    torch.manual_seed(1)
    B, T, H, K = 1, 4096, 32, 128
    q, k, v = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, K, device="cuda")) * 0.5
    beta = torch.rand(B, T, H, device="cuda")
    h0 = torch.randn(B, H, K, K, device="cuda") * 0.1
    with torch.no_grad():
        o1, s1 = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        o2, s2 = kda_chunk_torch(q.float(), k.float(), v.float(), g, beta, initial_state=h0, output_final_state=True)
    rows.append({"check": "chunk_kda vs kda_chunk_torch, T=4096 H=32 K=V=128, bf16 in (output)", "rel_err": rel(o1, o2)})
    rows.append({"check": "  same, final state", "rel_err": rel(s1, s2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.md / .json")
    args = parser.parse_args()
    if not torch.cuda.is_available() or fla_kda_ops() is None:
        sys.exit("gpu_check needs a CUDA GPU and flash-linear-attention (pip install 'fla-core>=0.5.1,<0.7')")
    import fla
    import transformers

    rows: list[dict] = []
    bare_op(rows)
    ref, fla_model = pair(torch.bfloat16)
    prefill_and_decode(ref, fla_model, rows, "dense-MLP model, bf16: ")
    padded_batch(ref, fla_model, rows)
    gradients(ref, fla_model, rows)
    del ref, fla_model
    ref, fla_model = pair(torch.float32, moe=True)
    prefill_and_decode(ref, fla_model, rows, "MoE model, fp32: ")
    head = (f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, transformers "
            f"{transformers.__version__}, fla {fla.__version__}; {datetime.date.today()}; bf16 unless a row says fp32")
    lines = [head, "", "| check | relative error | <= 1e-2 |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['rel_err']:.2e} | {'yes' if r['rel_err'] <= TARGET else 'NO'} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
