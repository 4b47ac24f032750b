"""FLA path vs PyTorch path on the same random weights (GPU, bf16).

At the release's width (hidden 2304, KDA 32 heads x 128) and with identical bf16 inputs: the bare KDA op, then one
KDA layer through prefill, 32 decode steps, a left-padded batch and gradients, the fused KDA decode step (this
package's Triton kernel) against the fla and PyTorch paths with its time per layer step, CUDA-graph decode against
op-by-op decode, each as a relative error
``||fla - torch|| / ||torch||`` against the 1e-2 target. Whole-model logits are reported for information next to
the model's own bf16 noise floor (the same rows computed in a different batch). The ``mla``, ``moe`` and ``kdastep``
checks compare this package's Triton decode kernels (MLA flash-decoding, the MoE's router and chosen experts, the
fused KDA step) with the PyTorch path and time both. ``guard`` checks CUDA-graph decode after the model changes.
Prints a markdown table and writes it (plus JSON) under ``--out``.

    python bench/gpu_check.py --out results/
    python bench/gpu_check.py --only mla,moe,kdastep,guard --out results/
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import os
import sys
import time
from pathlib import Path

import torch

if __package__:  # kimi_linear_bench.gpu_check (installed) or python -m bench.gpu_check
    from .gpu_check_common import T0, TARGET, Rows, check_config, pair, rel, set_backend
    from .gpu_check_kernels import (
        kda_decode_step_checks, mla_decode_check, moe_decode, moe_int8_check, multi_linear_check, rms_norm_check,
    )
    from .gpu_report import pdl_env, save_report, versions_header
else:  # run as a script from a checkout (python bench/gpu_check.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpu_check_common import T0, TARGET, Rows, check_config, pair, rel, set_backend  # type: ignore[no-redef]
    from gpu_check_kernels import (  # type: ignore[no-redef]
        kda_decode_step_checks, mla_decode_check, moe_decode, moe_int8_check, multi_linear_check, rms_norm_check,
    )
    from gpu_report import pdl_env, save_report, versions_header  # type: ignore[no-redef]

from modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.kda_fla import FLA_INSTALL_HINT, fla_kda_ops  # noqa: E402
from modeling_kimi_linear.kda_torch import kda_chunk_torch  # noqa: E402
from modeling_kimi_linear.transformers_compat import output_cache  # noqa: E402

def kda_layer_checks(rows: list[dict]) -> None:
    """One KDA layer at full width, same bf16 inputs through both paths: prefill, decode, padding, gradients."""
    from modeling_kimi_linear import KimiLinearCache

    ref_model, fla_model = pair(torch.bfloat16, layers=["linear_attention"])
    ref, fla = ref_model.model.layers[0].self_attn, fla_model.model.layers[0].self_attn
    cfg = ref_model.config
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 1000, 2304, device="cuda", dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():
        ca, cb = KimiLinearCache(cfg), KimiLinearCache(cfg)
        a, b = fla(x, cache=ca), ref(x, cache=cb)
        rows.append({"check": "KDA layer prefill output (B=2, T=1000)", "rel_err": rel(a, b)})
        rows.append({"check": "KDA layer state after prefill", "rel_err": rel(ca.kda_state(0)[1], cb.kda_state(0)[1])})
        worst = 0.0
        for _ in range(32):
            xt = torch.randn(2, 1, 2304, device="cuda", dtype=torch.bfloat16, generator=gen)
            worst = max(worst, rel(fla(xt, cache=ca), ref(xt, cache=cb)))
        rows.append({"check": "KDA layer decode output, 32 steps after prefill (worst step)", "rel_err": worst})
        rows.append({"check": "KDA layer state after decode", "rel_err": rel(ca.kda_state(0)[1], cb.kda_state(0)[1])})
        mask = torch.ones(3, 300, dtype=torch.bool, device="cuda")
        mask[1, :117] = False
        mask[2, :250] = False
        xp = torch.randn(3, 300, 2304, device="cuda", dtype=torch.bfloat16, generator=gen)
        a, b = fla(xp, token_mask=mask), ref(xp, token_mask=mask)
        rows.append({"check": "KDA layer, left-padded batch (valid positions; fla unpads into cu_seqlens, torch uses "
                              "zero gates)", "rel_err": rel(a[mask], b[mask])})
        alone = fla(xp[2:, 250:])
        rows.append({"check": "KDA layer, padded row vs the row alone (fla path)", "rel_err": rel(a[2, 250:], alone[0])})
    xg = torch.randn(2, 512, 2304, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(2, 512, 2304, device="cuda", dtype=torch.bfloat16, generator=gen)
    grads = {}
    for name, layer in (("fla", fla), ("torch", ref)):
        layer.zero_grad(set_to_none=True)
        xi = xg.clone().requires_grad_(True)
        (layer(xi).float() * weight).sum().backward()
        grads[name] = {"input": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}}
        torch.cuda.synchronize()
        print(f"[{time.perf_counter() - T0:.0f}s] gradients through the {name} path done", flush=True)
    # float64 reference: the same layer and inputs entirely in fp64 on the torch path
    ref64 = copy.deepcopy(ref).double()
    ref64.zero_grad(set_to_none=True)
    xi = xg.double().requires_grad_(True)
    (ref64(xi) * weight.double()).sum().backward()
    grads["fp64"] = {"input": xi.grad, **{n: p.grad for n, p in ref64.named_parameters()}}
    errs = {n: rel(grads["fla"][n], grads["torch"][n]) for n in grads["torch"]}
    for n in ("input", "q_proj.weight", "v_proj.weight", "f_b_proj.weight", "b_proj.weight", "dt_bias", "A_log"):
        rows.append({"check": f"KDA layer gradient: {n}", "rel_err": errs[n]})
    rows.append({"check": "KDA layer gradient: worst parameter", "rel_err": max(errs.values())})
    for n in ("f_b_proj.weight", "dt_bias", "A_log"):
        for path in ("fla", "torch"):
            rows.append({"check": f"  {n} gradient, {path} path (bf16) vs fp64 reference", "info": True,
                         "rel_err": rel(grads[path][n], grads["fp64"][n])})


@torch.no_grad()
def model_level(rows: list[dict]) -> None:
    """Whole model (3 KDA + 1 MLA, dense MLPs), bf16: informational, next to the bf16 noise floor of the model."""
    ref, fla = pair(torch.bfloat16)
    ids = torch.randint(3, 4096, (2, 1000), device="cuda")
    rows.append({"check": "model logits, bf16 (informational)", "rel_err": rel(fla(ids).logits, ref(ids).logits),
                 "info": True})
    batch = ref(torch.cat([ids, torch.randint(3, 4096, (6, 1000), device="cuda")]), use_cache=False).logits[:2]
    rows.append({"check": "noise floor: torch path, same rows in a batch of 8 vs of 2", "info": True,
                 "rel_err": rel(batch, ref(ids, use_cache=False).logits)})


@torch.no_grad()
def stability(rows: list[dict], prefill: int, steps: int) -> None:
    """bf16 prefill of ``prefill`` tokens then ``steps`` decode steps through both paths (same tokens fed to both):
    no NaN/inf, bounded recurrent-state norms, and the two paths still agreeing at the end."""
    ref, fla = pair(torch.bfloat16, layers=["linear_attention", "full_attention"])
    ids = torch.randint(3, 4096, (1, prefill), device="cuda")
    a, b = fla(ids, logits_to_keep=1), ref(ids, logits_to_keep=1)
    ca, cb = output_cache(a), output_cache(b)
    nxt = a.logits[:, -1:].argmax(-1)
    finite, max_norm = True, 0.0
    for step in range(steps):
        a, b = fla(nxt, past_key_values=ca), ref(nxt, past_key_values=cb)
        if step % 500 == 0 or step == steps - 1:
            finite &= bool(torch.isfinite(a.logits).all() and torch.isfinite(b.logits).all())
            max_norm = max(max_norm, float(ca.kda_state(0)[1].norm(dim=(-2, -1)).max()))
        nxt = a.logits[:, -1:].argmax(-1)
    rows.append({"check": f"stability: {prefill} prefill + {steps} decode steps, all logits finite", "info": True,
                 "rel_err": 0.0 if finite else float("inf")})
    rows.append({"check": "stability: largest per-head state norm seen (a norm, not an error)", "info": True,
                 "rel_err": max_norm})
    rows.append({"check": f"stability: final logits, fla vs torch after {steps} steps", "rel_err": rel(a.logits, b.logits)})
    rows.append({"check": "stability: final KDA state, fla vs torch", "rel_err": rel(ca.kda_state(0)[1], cb.kda_state(0)[1])})


@torch.no_grad()
def graph_decode(rows: list[dict]) -> None:
    """CUDA-graph decode vs op-by-op decode of the same model (3 KDA + 1 MLA, 16 experts top-4, bf16, fla path):
    a left-padded batch of 2 decoded for 100 steps from 250 cached tokens (over two bucket boundaries, the cache
    buffers growing), then greedy ``generate()`` both ways. The first two runs launch this package's Triton kernels
    without programmatic dependent launch (``KIMI_LINEAR_PDL=0``, the default); a third, a copy of the model decoding
    through graphs with it (``modeling_kimi_linear/pdl.py``), is compared with op-by-op decoding the same way."""
    torch.manual_seed(0)
    model = set_backend(KimiLinearForCausalLM(check_config(moe=True)).to("cuda", torch.bfloat16).eval(), "fla")
    models = {"eager": model, "graph": model, "graph, PDL": copy.deepcopy(model)}
    ids = torch.randint(3, 4096, (2, 250), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :40] = 0

    def run(mode: str, *args, **kwargs):  # noqa: ANN202
        m = models[mode]
        m.cuda_graph_decode = mode != "eager"
        with pdl_env(mode == "graph, PDL"):
            return m(*args, **kwargs) if "max_new_tokens" not in kwargs else m.generate(*args, **kwargs)

    caches = {}
    for mode in models:
        out = run(mode, ids, attention_mask=mask)
        caches[mode] = output_cache(out)
    token, step_mask = out.logits[:, -1:].argmax(-1), mask
    worst, times = dict.fromkeys(models, 0.0), {mode: [] for mode in models}
    for _ in range(100):
        step_mask = torch.cat([step_mask, step_mask.new_ones(2, 1)], 1)
        logits = {}
        for mode in models:
            torch.cuda.synchronize()
            t = time.perf_counter()
            logits[mode] = run(mode, token, attention_mask=step_mask, past_key_values=caches[mode]).logits
            torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t)
            worst[mode] = max(worst[mode], rel(logits[mode], logits["eager"]))
        token = logits["eager"][:, -1:].argmax(-1)
    for mode in ("graph", "graph, PDL"):
        rows.append({"check": f"CUDA-graph decode{' with PDL' if 'PDL' in mode else ''} vs op-by-op decode, logits, "
                              "100 steps from 250 tokens (worst step)", "rel_err": worst[mode]})
        rows.append({"check": "  same, KDA state at the end", "rel_err": rel(caches[mode].kda_state(0)[1],
                                                                             caches["eager"].kda_state(0)[1])})
    median = {m: sorted(t)[len(t) // 2] * 1e3 for m, t in times.items()}
    rows.append({"check": f"  step time (ms, a time, not an error): eager {median['eager']:.2f}, graph "
                          f"{median['graph']:.2f}, graph with PDL {median['graph, PDL']:.2f}; slowest graph step "
                          f"(captures) {max(times['graph']) * 1e3:.0f}", "rel_err": median["graph"], "info": True})
    seqs = {mode: run(mode, ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0)
            for mode in models}
    for mode in ("graph", "graph, PDL"):
        same = (seqs["eager"] == seqs[mode]).float().mean().item()
        rows.append({"check": f"generate(): share of greedy tokens that differ, {mode} vs eager (64 new tokens, "
                              "bf16)", "rel_err": 1.0 - same, "info": True})


@torch.no_grad()
def guard_checks(rows: list[dict]) -> None:
    """CUDA-graph decode after the model changes under it (modeling_kimi_linear/decode_guard.py): for each change a
    user can make, decode 8 steps from a 40-token prompt op by op and through graphs side by side, apply the change
    after step 4 (graphs for this cache are already captured), and compare logits (fp32, so a stale graph would
    show as an O(1) error, not as bf16 noise). Then the same for changes between two ``generate()`` calls."""
    from modeling_kimi_linear.cuda_graph_decode import StaticDecoder

    torch.manual_seed(0)
    model = set_backend(KimiLinearForCausalLM(check_config(moe=True)).to("cuda").eval(), "fla")
    other = set_backend(KimiLinearForCausalLM(check_config(moe=True)).to("cuda").eval(), "fla")
    ids = torch.randint(3, 4096, (2, 40), device="cuda")

    def side_by_side(change, target=model) -> float:  # noqa: ANN001
        caches, tokens, worst = {}, {}, 0.0
        for mode in ("eager", "graph"):
            model.cuda_graph_decode = mode == "graph"
            out = target(input_ids=ids)
            caches[mode], tokens[mode] = output_cache(out), out.logits[:, -1:].argmax(-1)
        for step in range(8):
            if step == 4:
                change()
            logits = {}
            for mode in ("eager", "graph"):
                model.cuda_graph_decode = mode == "graph"
                logits[mode] = target(input_ids=tokens["eager"], past_key_values=caches[mode]).logits
            worst = max(worst, rel(logits["graph"], logits["eager"]))
            tokens["eager"] = logits["eager"][:, -1:].argmax(-1)
        assert isinstance(model.__dict__.get("_graph_decoder"), StaticDecoder)
        return worst

    gate = model.model.layers[3].block_sparse_moe.gate
    proj = model.model.layers[3].self_attn.o_proj
    changes = {
        "nothing changed (baseline)": lambda: None,
        "load_state_dict(other weights, assign=True)": lambda: model.load_state_dict(other.state_dict(), assign=True),
        "router bias replaced by a new nn.Parameter": lambda: setattr(
            gate, "e_score_correction_bias", torch.nn.Parameter(torch.randn(16, device="cuda"), requires_grad=False)),
        "o_proj weight moved (param.data = ...)": lambda: setattr(proj.weight, "data", -proj.weight.detach().clone()),
    }
    for what, change in changes.items():
        rows.append({"check": f"guard, mid-decode: {what}: graph vs op by op, logits (worst step, fp32)",
                     "rel_err": side_by_side(change)})
    guard_cost(rows)
    try:
        import peft
    except ImportError:
        rows.append({"check": "guard: LoRA rows skipped (peft not importable)", "rel_err": 0.0, "info": True})
        return
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "o_proj", "kv_a_proj_with_mqa"]))
    lora.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj", "kv_a_proj_with_mqa"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.05)
    lora.eval()
    adapter_changes = {
        "LoRA adapter switched off (disable_adapters)": lambda: lora.base_model.disable_adapter_layers(),
        "LoRA adapter switched on again": lambda: lora.base_model.enable_adapter_layers(),
        "set_adapter to a second adapter": lambda: lora.set_adapter("second"),
        "adapter merged into the weights": lambda: lora.base_model.merge_adapter(),
    }
    for what, change in adapter_changes.items():
        rows.append({"check": f"guard, mid-decode: {what}: graph vs op by op, logits (worst step, fp32)",
                     "rel_err": side_by_side(change, target=lora)})
    lora.base_model.unmerge_adapter()
    model.to(torch.bfloat16)  # between two generate() calls: a cast model
    seqs = {}
    for mode in ("eager", "graph"):
        model.cuda_graph_decode = mode == "graph"
        seqs[mode] = lora.generate(input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    rows.append({"check": "guard: model.to(bfloat16) after fp32 decoding, generate(): share of greedy tokens that "
                          "differ, graph vs eager", "rel_err": 1.0 - (seqs["eager"] == seqs["graph"]).float().mean().item(),
                 "info": True})


def guard_cost(rows: list[dict]) -> None:
    """The host's time for the per-step model check on this machine (it sits between transformers' read-back of
    the stop flag and the next replay), for the 48B layout cut to 16 layers at a tiny width (the same 343 tensors;
    the check's cost depends on their number, not their size): all of ``ModelGuard.changed`` and its pointer
    comparison, by torch's C++ helper (CUDA builds) and by a Python pass."""
    from modeling_kimi_linear import decode_guard
    from modeling_kimi_linear.presets import load_preset

    base = load_preset("tiny")
    lac = dict(base.linear_attn_config, kda_layers=[i + 1 for i in range(16) if i % 4 != 3],
               full_attn_layers=[i + 1 for i in range(16) if i % 4 == 3])
    model = KimiLinearForCausalLM(load_preset("tiny", num_hidden_layers=16, linear_attn_config=lac)).to("cuda")
    guard = decode_guard.ModelGuard(model)
    tensors, addresses, indices = guard._plain, guard._plain_addresses, guard._plain_indices

    def us(fn, n: int = 2000) -> float:  # noqa: ANN001
        fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1e6

    helper = decode_guard._C_POINTERS_EQUAL
    c_us = us(lambda: helper(tensors, addresses, indices)) if helper is not None else float("nan")
    py_us = us(lambda: list(map(decode_guard._DATA_PTR, tensors)) == addresses)
    changed_us = us(guard.changed)
    rows.append({"check": f"guard: host us per step for {len(tensors)} tensors (a time): ModelGuard.changed "
                          f"{changed_us:.1f}; pointer comparison by torch's C++ helper {c_us:.1f} "
                          f"({'present' if helper is not None else 'absent'}), by a Python pass {py_us:.1f}",
                 "rel_err": changed_us, "info": True})


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


WITHOUT_FLA = {"mla", "moe", "moetiles", "mlinear", "norm", "moeint8"}  # checks of this package's own kernels alone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.md / .json")
    parser.add_argument("--only", default="bare,layer,kdastep,model,graph,guard,moe,stability",
                        help="comma-separated checks to run, in this order (bare, layer, kdastep, model, graph, guard, "
                             "moe, stability, mla, moetiles, mlinear, norm, moeint8; moetiles = moe plus its tile "
                             "sweep)")
    parser.add_argument("--stability", default="32768,10000", help="prefill,decode-steps of the stability run "
                        "('0,0' skips it)")
    parser.add_argument("--traceback-after", type=float, default=0,
                        help="print every thread's stack after this many seconds (to see where a slow run is)")
    args = parser.parse_args(argv)
    if args.traceback_after:
        faulthandler.dump_traceback_later(args.traceback_after)
    rows: list[dict] = Rows()
    prefill, steps = (int(x) for x in args.stability.split(","))
    checks = {"bare": lambda: bare_op(rows), "layer": lambda: kda_layer_checks(rows),
              "kdastep": lambda: kda_decode_step_checks(rows), "model": lambda: model_level(rows),
              "graph": lambda: graph_decode(rows), "guard": lambda: guard_checks(rows),
              "stability": lambda: steps and stability(rows, prefill, steps), "mla": lambda: mla_decode_check(rows),
              "moe": lambda: moe_decode(rows), "moetiles": lambda: moe_decode(rows, tiles=True),
              "mlinear": lambda: multi_linear_check(rows),
              "norm": lambda: rms_norm_check(rows), "moeint8": lambda: moe_int8_check(rows)}
    names = args.only.split(",")
    unknown = [n for n in names if n not in checks]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {sorted(checks)}")
    if not torch.cuda.is_available() or (fla_kda_ops() is None and set(names) - WITHOUT_FLA):
        sys.exit(f"gpu_check needs a CUDA GPU, and fla's kernels for every check but {sorted(WITHOUT_FLA)}: "
                 + FLA_INSTALL_HINT)
    for name in names:  # in the order given, so the one that matters most can go first in a short lease
        done = len(rows)
        checks[name]()
        for r in rows[done:]:  # as each check ends: a run cut short by its lease still shows what it measured
            print(f"[{name}] {r['check']}: {r['rel_err']:.3e}", flush=True)
    head = versions_header("bf16 unless a row says fp32")
    lines = [head, "", "| check | relative error | <= 1e-2 |", "|---|---|---|"]
    for r in rows:
        verdict = "-" if r.get("info") else ("yes" if r["rel_err"] <= TARGET else "NO")
        lines.append(f"| {r['check']} | {r['rel_err']:.2e} | {verdict} |")
    save_report(args.out, "gpu_check", "\n".join(lines), head, rows)

if __name__ == "__main__":
    main()
