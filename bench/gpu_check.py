"""FLA path vs PyTorch path on the same random weights (GPU, bf16).

At the release's width (hidden 2304, KDA 32 heads x 128) and with identical bf16 inputs: the bare KDA op, then one
KDA layer through prefill, 32 decode steps, a left-padded batch and gradients, the fused KDA decode step (this
package's Triton kernel) against the fla and PyTorch paths with its time per layer step, CUDA-graph decode against
op-by-op decode, each as a relative error
``||fla - torch|| / ||torch||`` against the 1e-2 target. Whole-model logits are reported for information next to
the model's own bf16 noise floor (the same rows computed in a different batch). The ``mla`` check compares the MLA
flash-decoding Triton kernel with the PyTorch latent path and times both (achieved bandwidth against the copy
bandwidth). Prints a markdown table and writes it (plus JSON) under ``--out``.

    python bench/gpu_check.py --out results/
    python bench/gpu_check.py --only mla --out results/
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch

if __package__:  # kimi_linear_bench.gpu_check (installed) or python -m bench.gpu_check
    from .gpu_report import save_report, versions_header
else:  # run as a script from a checkout (python bench/gpu_check.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpu_report import save_report, versions_header  # type: ignore[no-redef]

from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.kda_fla import FLA_INSTALL_HINT, fla_kda_ops  # noqa: E402
from modeling_kimi_linear.kda_torch import kda_chunk_torch  # noqa: E402
from modeling_kimi_linear.transformers_compat import output_cache  # noqa: E402

TARGET = 1e-2
T0 = time.perf_counter()


class Rows(list):
    """Result rows, each also printed as it comes (a later failure leaves the earlier results in the log)."""

    def append(self, row: dict) -> None:
        print(json.dumps(row), flush=True)
        super().append(row)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_config(moe: bool, layers: list[str] | None = None) -> KimiLinearConfig:
    """The release's widths (hidden 2304, KDA 32 heads x 128, MLA 512 + 64 latent); 4 layers (3 KDA + 1 MLA) unless
    ``layers`` is given. Without ``moe`` every layer has a dense MLP."""
    layers = layers or ["linear_attention"] * 3 + ["full_attention"]
    return KimiLinearConfig(
        vocab_size=4096, hidden_size=2304, intermediate_size=2048, num_hidden_layers=len(layers),
        layer_types=layers, linear_attn_config={"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4},
        num_experts=16 if moe else None, num_experts_per_token=4, moe_intermediate_size=512, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )


def set_backend(model: KimiLinearForCausalLM, backend: str) -> KimiLinearForCausalLM:
    """``"torch"``: every kernel the PyTorch reference (fla's and this package's Triton decode kernels off);
    ``"fla"``: fla's kernels and this package's Triton decode kernels (``decode_kernels="auto"``)."""
    model.config.kda_backend = backend
    model.config.decode_kernels = "torch" if backend == "torch" else "auto"
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "backend"):
            layer.self_attn.backend = backend
        if hasattr(layer.self_attn, "decode_kernels"):
            layer.self_attn.decode_kernels = model.config.decode_kernels
    return model


def pair(dtype: torch.dtype, moe: bool = False, layers=None):
    torch.manual_seed(0)
    ref = KimiLinearForCausalLM(check_config(moe, layers)).to("cuda", dtype).eval()
    return set_backend(ref, "torch"), set_backend(copy.deepcopy(ref), "fla")


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


def set_decode_kernels(layer: torch.nn.Module, choice: str) -> torch.nn.Module:
    layer.decode_kernels = choice
    return layer


def replay_us(step, repeats: int = 20, iters: int = 50) -> float:
    """Microseconds per call of ``step()`` (CUDA work only, no host writes), from replays of a CUDA graph holding
    ``repeats`` calls in a row (as a model's graph holds its layers one after another; one call per graph would time
    the graph launch instead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and autotune outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (iters * repeats)


@torch.no_grad()
def kda_decode_step_checks(rows: list[dict]) -> None:
    """The fused KDA decode step (``decode_kernels="triton"``, one Triton kernel between the projections and
    ``o_proj``) against the fla path (``decode_kernels="torch"``: PyTorch conv update and gate math, fla's
    fused_recurrent_kda and gated norm) and the PyTorch path, one KDA layer at full width in bf16: a left-padded
    prefill of 2 x 300 tokens, then 32 decode steps (one with a padded token), outputs every step and the cached
    states at the end. Then the time of one layer step (CUDA-graph replays, cache updated in place) both ways, at
    batch 1 and 8, the projections + o_proj alone (what the two paths share), and the kernel alone at 4, 8 and 16
    warps."""
    from modeling_kimi_linear import KimiLinearCache, kda_decode_triton, kda_layer

    ref_model, fla_model = pair(torch.bfloat16, layers=["linear_attention"])
    cfg = ref_model.config
    ref = set_decode_kernels(ref_model.model.layers[0].self_attn, "torch")
    fla = set_decode_kernels(fla_model.model.layers[0].self_attn, "torch")
    fused = set_decode_kernels(copy.deepcopy(fla), "triton")
    launches = []
    fused_step = kda_layer.kda_decode_step

    def counted(*args, **kwargs):
        launches.append(1)
        return fused_step(*args, **kwargs)

    kda_layer.kda_decode_step = counted
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(2, 300, 2304, device="cuda", dtype=torch.bfloat16, generator=gen)
        mask = torch.ones(2, 300, dtype=torch.bool, device="cuda")
        mask[1, :40] = False
        caches = {name: KimiLinearCache(cfg) for name in ("fused", "fla", "torch")}
        layers = {"fused": fused, "fla": fla, "torch": ref}
        for name, layer in layers.items():
            layer(x, token_mask=mask, cache=caches[name])
        worst = {"fla": 0.0, "torch": 0.0}
        for step in range(32):
            xt = torch.randn(2, 1, 2304, device="cuda", dtype=torch.bfloat16, generator=gen)
            step_mask = torch.tensor([[True], [step != 10]], device="cuda")
            out = {name: layer(xt, token_mask=step_mask, cache=caches[name]) for name, layer in layers.items()}
            for other in worst:
                worst[other] = max(worst[other], rel(out["fused"], out[other]))
    finally:
        kda_layer.kda_decode_step = fused_step
    rows.append({"check": f"fused KDA decode step: kernel launches in 32 steps (a count, must be 32): {len(launches)}",
                 "rel_err": 0.0 if len(launches) == 32 else float("inf")})
    for other, label in (("fla", "fla path"), ("torch", "PyTorch path")):
        conv_a, state_a = caches["fused"].kda_state(0)
        conv_b, state_b = caches[other].kda_state(0)
        rows.append({"check": f"fused KDA decode step vs {label}: output, 32 steps after a padded prefill, B=2, one "
                              "padded step (worst step)", "rel_err": worst[other]})
        rows.append({"check": "  same, recurrent state after the 32 steps", "rel_err": rel(state_a, state_b)})
        rows.append({"check": "  same, conv tail after the 32 steps", "rel_err": rel(conv_a, conv_b)})

    for bsz in (1, 8):
        xt = torch.randn(bsz, 1, 2304, device="cuda", dtype=torch.bfloat16, generator=gen)
        times = {}
        for name, layer in (("fused", fused), ("fla", fla)):
            cache = KimiLinearCache(cfg)
            layer(torch.randn(bsz, 16, 2304, device="cuda", dtype=torch.bfloat16, generator=gen), cache=cache)
            cache.make_writable()
            cache.graph_step = object()  # a static step: the layer updates the cached tensors in place
            try:
                times[name] = replay_us(lambda: layer(xt, cache=cache))
            finally:
                cache.graph_step = None
        proj = fused.split_projections(xt)
        times["shared"] = replay_us(lambda: (fused.split_projections(xt), fused.o_proj(proj[0])))
        speedup = times["fla"] / times["fused"]
        rows.append({"check": f"KDA layer decode step, B={bsz}, us per layer (graph replay; a time, not an error): fla "
                              f"path {times['fla']:.1f}, fused {times['fused']:.1f} ({speedup:.2f}x);"
                              f" projections + o_proj alone {times['shared']:.1f}, so the part between them: fla "
                              f"{times['fla'] - times['shared']:.1f}, fused {times['fused'] - times['shared']:.1f}",
                     "rel_err": times["fused"], "info": True})
        conv, state = (t.clone() for t in caches["fused"].kda_state(0))
        if bsz != conv.shape[0]:
            conv = conv[:1].expand(bsz, -1, -1).contiguous()
            state = state[:1].expand(bsz, -1, -1, -1).contiguous()
        q, k, v, f, b, gate = proj
        kernel = {}
        for warps in (4, 8, 16):
            kernel[warps] = replay_us(lambda: kda_decode_triton.kda_decode_step(
                q, k, v, f, b, gate, (fused.q_conv1d.weight, fused.k_conv1d.weight, fused.v_conv1d.weight),
                fused.A_log, fused.dt_bias, fused.o_norm.weight, fused.o_norm.variance_epsilon, conv, state,
                in_place=True, num_warps=warps))
        rows.append({"check": f"  fused kernel alone, B={bsz}, us per call at 4 / 8 / 16 warps (default "
                              f"{kda_decode_triton.DEFAULT_NUM_WARPS}): "
                              + " / ".join(f"{kernel[w]:.1f}" for w in (4, 8, 16)),
                     "rel_err": kernel[kda_decode_triton.DEFAULT_NUM_WARPS], "info": True})


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
    buffers growing), then greedy ``generate()`` both ways."""

    torch.manual_seed(0)
    model = set_backend(KimiLinearForCausalLM(check_config(moe=True)).to("cuda", torch.bfloat16).eval(), "fla")
    ids = torch.randint(3, 4096, (2, 250), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    caches = {}
    for mode in ("eager", "graph"):
        model.cuda_graph_decode = mode == "graph"
        out = model(ids, attention_mask=mask)
        caches[mode] = output_cache(out)
    token, step_mask = out.logits[:, -1:].argmax(-1), mask
    worst, times = 0.0, {"eager": [], "graph": []}
    for _ in range(100):
        step_mask = torch.cat([step_mask, step_mask.new_ones(2, 1)], 1)
        logits = {}
        for mode in ("eager", "graph"):
            model.cuda_graph_decode = mode == "graph"
            torch.cuda.synchronize()
            t = time.perf_counter()
            logits[mode] = model(token, attention_mask=step_mask, past_key_values=caches[mode]).logits
            torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t)
        worst = max(worst, rel(logits["graph"], logits["eager"]))
        token = logits["eager"][:, -1:].argmax(-1)
    rows.append({"check": "CUDA-graph decode vs op-by-op decode, logits, 100 steps from 250 tokens (worst step)",
                 "rel_err": worst})
    rows.append({"check": "  same, KDA state at the end", "rel_err": rel(caches["graph"].kda_state(0)[1],
                                                                         caches["eager"].kda_state(0)[1])})
    median = {m: sorted(t)[len(t) // 2] * 1e3 for m, t in times.items()}
    rows.append({"check": f"  step time (ms, a time, not an error): eager {median['eager']:.2f}, graph "
                          f"{median['graph']:.2f}; slowest graph step (captures) {max(times['graph']) * 1e3:.0f}",
                 "rel_err": median["graph"], "info": True})
    seqs = {}
    for mode in ("eager", "graph"):
        model.cuda_graph_decode = mode == "graph"
        seqs[mode] = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0)
    same = (seqs["eager"] == seqs["graph"]).float().mean().item()
    rows.append({"check": "generate(): share of greedy tokens that differ, graph vs eager (64 new tokens, bf16)",
                 "rel_err": 1.0 - same, "info": True})


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


@torch.no_grad()
def mla_decode_check(rows: list[dict]) -> None:
    """The MLA flash-decoding kernel (``decode_kernels="triton"``) against the PyTorch latent path of the same
    layer (release shape: 32 heads, 512 + 64 latent, bf16), one new token, at 4K / 128K / 1M cached rows (batch 1)
    and a left-padded batch of 4 at 128K attending over a view of a larger buffer, as a CUDA-graph step does.
    Times (``triton.testing.do_bench``, median, L2 flushed between runs): the kernel alone, as latent bytes / time
    and as a share of the copy bandwidth measured here; the layer's whole latent attention (query absorption,
    attention, value projection) on both paths. At 1M rows every launch configuration in ``CONFIGS`` is timed."""
    from triton.testing import do_bench

    from bench.gpu import copy_bandwidth
    from modeling_kimi_linear.mla_decode_triton import CONFIGS, default_config, mla_decode_attention
    from modeling_kimi_linear.mla_layer import KimiMLAAttention

    bw = copy_bandwidth()
    rows.append({"check": f"MLA decode: copy bandwidth {bw / 1e12:.2f} TB/s (a rate, not an error)", "info": True,
                 "rel_err": bw / 1e12})
    torch.manual_seed(0)
    layer = KimiMLAAttention(check_config(moe=False, layers=["full_attention"]), 0).to("cuda", torch.bfloat16).eval()
    layer32 = copy.deepcopy(layer).float()
    width = layer.kv_lora_rank + layer.rope_dim
    gen = torch.Generator(device="cuda").manual_seed(0)

    def bench_ms(fn) -> float:
        return do_bench(fn, warmup=10, rep=100, return_mode="median")

    def attend(choice: str, *args) -> torch.Tensor:
        layer.decode_kernels = choice
        return layer.attend_latent(*args)

    for bsz, rows_n, pads, spare in ((1, 4096, None, 0), (1, 131072, None, 0), (1, 1 << 20, None, 0),
                                     (4, 131072, [0, 4096, 65536, 131071], 1024)):
        buf = torch.randn(bsz, rows_n + spare, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        latent = buf[:, :rows_n]
        valid = torch.ones(bsz, rows_n, dtype=torch.bool, device="cuda")
        for b, pad in enumerate(pads or []):
            valid[b, :pad] = False
        mask = valid[:, None, None, :]
        q = torch.randn(bsz, layer.num_heads, 1, layer.q_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        name = f"B={bsz}, S={rows_n}" + (f", left padding {pads}" if pads else "")
        want, got = attend("torch", q, latent, mask), attend("triton", q, latent, mask)
        exact = layer32.attend_latent(q.float(), latent.float(), mask)  # fp32 PyTorch path: how far each bf16 one is
        rows.append({"check": f"MLA decode kernel vs PyTorch latent path, {name}", "rel_err": rel(got, want)})
        rows.append({"check": "  same, kernel vs fp32 PyTorch path (information)", "info": True,
                     "rel_err": rel(got, exact)})
        rows.append({"check": "  same, PyTorch bf16 path vs fp32 (its noise floor)", "info": True,
                     "rel_err": rel(want, exact)})
        del exact
        nbytes = bsz * rows_n * width * latent.element_size()  # latent bytes one step reads
        q_lat = torch.randn(bsz, layer.num_heads, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        configs = CONFIGS if rows_n == 1 << 20 else (default_config(torch.bfloat16),)
        for config in configs:
            try:
                ms = bench_ms(lambda c=config: mla_decode_attention(q_lat, latent, valid, layer.scaling,
                                                                    layer.kv_lora_rank, config=c))
            except Exception as err:  # a configuration that does not fit this GPU: say so, keep going
                rows.append({"check": f"  kernel {config}: failed: {type(err).__name__}: {err}"[:300],
                             "info": True, "rel_err": float("nan")})
                continue
            rate = nbytes / (ms * 1e-3)
            rows.append({"check": f"  kernel alone ({config}): {ms * 1e3:.1f} us, {rate / 1e12:.2f} TB/s = "
                                  f"{rate / bw:.0%} of copy bandwidth (value: us)", "info": True,
                         "rel_err": ms * 1e3})
        t_torch = bench_ms(lambda: attend("torch", q, latent, mask))
        t_triton = bench_ms(lambda: attend("triton", q, latent, mask))
        rows.append({"check": f"  attend_latent: PyTorch {t_torch * 1e3:.1f} us, Triton {t_triton * 1e3:.1f} us "
                              f"({t_torch / t_triton:.1f}x); Triton path {nbytes / (t_triton * 1e-3) / bw:.0%} of copy "
                              f"bandwidth (value: Triton us)", "info": True, "rel_err": t_triton * 1e3})
        del buf, latent, want, got
        torch.cuda.empty_cache()
        print(f"[{time.perf_counter() - T0:.0f}s] MLA decode {name} done", flush=True)
    # the kernel inside a CUDA graph (as a decode step captures it) replays what it computes eagerly
    buf = torch.randn(2, 5000, width, device="cuda", dtype=torch.bfloat16, generator=gen)
    valid = torch.arange(4096, device="cuda")[None, :] >= torch.tensor([[0], [1000]], device="cuda")
    q = torch.randn(2, layer.num_heads, 1, layer.q_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attend("triton", q, buf[:, :4096], valid[:, None, None])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attend("triton", q, buf[:, :4096], valid[:, None, None])
    q.copy_(torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=gen))
    graph.replay()
    rows.append({"check": "MLA decode kernel replayed in a CUDA graph vs eager (new query after capture)",
                 "rel_err": rel(captured, attend("triton", q, buf[:, :4096], valid[:, None, None]))})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.md / .json")
    parser.add_argument("--only", default="bare,layer,kdastep,model,graph,guard,stability",
                        help="comma-separated checks to run, in this order (bare, layer, kdastep, model, graph, guard, "
                             "stability, mla)")
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
              "stability": lambda: steps and stability(rows, prefill, steps), "mla": lambda: mla_decode_check(rows)}
    names = args.only.split(",")
    unknown = [n for n in names if n not in checks]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {sorted(checks)}")
    if not torch.cuda.is_available() or (fla_kda_ops() is None and names != ["mla"]):
        sys.exit(f"gpu_check needs a CUDA GPU and fla's kernels: {FLA_INSTALL_HINT}")
    for name in names:  # in the order given, so the one that matters most can go first in a short lease
        checks[name]()
    head = versions_header("bf16 unless a row says fp32")
    lines = [head, "", "| check | relative error | <= 1e-2 |", "|---|---|---|"]
    for r in rows:
        verdict = "-" if r.get("info") else ("yes" if r["rel_err"] <= TARGET else "NO")
        lines.append(f"| {r['check']} | {r['rel_err']:.2e} | {verdict} |")
    save_report(args.out, "gpu_check", "\n".join(lines), head, rows)

if __name__ == "__main__":
    main()
