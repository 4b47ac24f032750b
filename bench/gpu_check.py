"""FLA path vs PyTorch path on the same random weights (GPU, bf16).

At the release's width (hidden 2304, KDA 32 heads x 128) and with identical bf16 inputs: the bare KDA op, then one
KDA layer through prefill, 32 decode steps, a left-padded batch and gradients, CUDA-graph decode against op-by-op
decode, each as a relative error
``||fla - torch|| / ||torch||`` against the 1e-2 target. Whole-model logits are reported for information next to
the model's own bf16 noise floor (the same rows computed in a different batch). The ``moe`` check compares this
package's Triton MoE decode kernels with the PyTorch path on one MoE block of the released width and times both.
Prints a markdown table and writes it (plus JSON) under ``--out``.

    python bench/gpu_check.py --out results/
    python bench/gpu_check.py --only moe --out results/    # the MoE decode kernels alone (no fla needed)
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_report import save_report, versions_header  # noqa: E402
from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.kda_fla import fla_kda_ops  # noqa: E402
from modeling_kimi_linear.kda_torch import kda_chunk_torch  # noqa: E402
from modeling_kimi_linear.moe import KimiSparseMoeBlock  # noqa: E402
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
    model.config.kda_backend = backend
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "backend"):
            layer.self_attn.backend = backend
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


RELEASE_CONFIG = Path(__file__).resolve().parent.parent / "configuration" / "kimi_linear_48b_a3b.json"


def graph_time_ms(fn, iters: int = 20) -> float:
    """Milliseconds per call of ``fn`` (which makes several block calls, see :func:`moe_decode`), replayed from a
    CUDA graph (launch overhead excluded), timed with CUDA events; the eager fallback if capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except RuntimeError as exc:  # a path that cannot be captured is timed op by op (and says so)
        print(f"CUDA graph capture failed ({exc}); timing eagerly", flush=True)
        run = fn
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), the roofline's reference."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_time_ms(lambda: dst.copy_(src), iters=10)
    return 2 * src.numel() / (ms * 1e-3)


def set_decode_kernels(block: KimiSparseMoeBlock, choice: str) -> None:
    block.gate.decode_kernels = block.experts.decode_kernels = choice


@torch.no_grad()
def moe_decode(rows: list[dict], batches=(1, 8, 32), reps: int = 8, device: str = "cuda",
               dtype: torch.dtype = torch.bfloat16, config=None, timing: bool = True) -> None:
    """One MoE block at the release's width (hidden 2304, 256 experts top-8, I = 1024, one shared expert, sigmoid
    router with bias, bf16, random weights) at each batch size, one token per sequence: the Triton decode path
    (``decode_kernels="triton"``) against the PyTorch path. Rows: the experts alone on the same routing, the whole
    block (router + experts + shared expert), the share of routing choices that differ, and times. Each timing
    replays a CUDA graph of ``reps`` calls on different tokens (different experts, so the weights do not sit in L2
    between calls) and divides by ``reps``; bandwidth = bytes of the distinct experts the call routes to / time."""
    from modeling_kimi_linear import KimiLinearConfig

    cfg = config or KimiLinearConfig.from_json_file(str(RELEASE_CONFIG))
    torch.manual_seed(0)
    with torch.device(device):
        block = KimiSparseMoeBlock(cfg).to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in block.named_parameters():
        std = 0.02 if "e_score_correction_bias" not in name else 0.1
        p.normal_(0.0, std, generator=gen)
    hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
    expert_bytes = 3 * hidden * inter * torch.finfo(dtype).bits // 8
    bandwidth = copy_bandwidth() if timing else float("nan")
    if timing:
        rows.append({"check": f"device copy bandwidth (TB/s, a rate, not an error): {bandwidth / 1e12:.2f}",
                     "rel_err": bandwidth / 1e12, "info": True})
    for batch in batches:
        xs = [torch.randn(batch, 1, hidden, device=device, dtype=dtype, generator=gen) for _ in range(reps)]
        flat = [x.view(-1, hidden) for x in xs]
        set_decode_kernels(block, "torch")
        routes = [block.gate(x) for x in flat]
        ref_experts = block.experts(flat[0], routes[0][0], routes[0][1])
        ref_block, _ = block(xs[0])
        set_decode_kernels(block, "triton")
        got_experts = block.experts(flat[0], routes[0][0], routes[0][1])
        got_block, _ = block(xs[0])
        got_ids = block.gate(flat[0])[0]
        rows.append({"check": f"MoE experts, Triton vs PyTorch, same routing (D {hidden}, E {cfg.num_experts} top-"
                              f"{cfg.num_experts_per_token}, I {inter}, batch {batch})",
                     "rel_err": rel(got_experts, ref_experts)})
        rows.append({"check": f"MoE block (router + experts + shared), Triton vs PyTorch (batch {batch})",
                     "rel_err": rel(got_block, ref_block)})
        differ = 1.0 - (got_ids.sort(-1).values == routes[0][0].sort(-1).values).float().mean().item()
        rows.append({"check": f"  router: share of expert choices that differ (batch {batch})", "rel_err": differ,
                     "info": True})
        if not timing:
            continue
        distinct = sum(r[0].unique().numel() for r in routes) / reps
        moved = distinct * expert_bytes
        times = {}
        for path in ("torch", "triton"):
            set_decode_kernels(block, path)
            times[path, "block"] = graph_time_ms(lambda: [block(x) for x in xs]) / reps
            times[path, "experts"] = graph_time_ms(
                lambda: [block.experts(x, r[0], r[1]) for x, r in zip(flat, routes)]) / reps
        achieved = moved / (times["triton", "experts"] * 1e-3)
        rows.append({
            "check": f"  time per call (us, a time): block torch {times['torch', 'block'] * 1e3:.1f} / triton "
                     f"{times['triton', 'block'] * 1e3:.1f}; experts torch {times['torch', 'experts'] * 1e3:.1f} / "
                     f"triton {times['triton', 'experts'] * 1e3:.1f}; {distinct:.1f} distinct experts = "
                     f"{moved / 1e6:.1f} MB -> triton experts {achieved / 1e12:.2f} TB/s "
                     f"({achieved / bandwidth:.0%} of copy), torch "
                     f"{moved / (times['torch', 'experts'] * 1e-3) / 1e12:.2f} TB/s (batch {batch})",
            "rel_err": times["triton", "block"] * 1e3, "info": True, "batch": batch,
            "times_us": {f"{p}_{part}": t * 1e3 for (p, part), t in times.items()},
            "distinct_experts": distinct, "expert_bytes": moved, "triton_experts_tb_s": achieved / 1e12,
            "copy_tb_s": bandwidth / 1e12,
        })
    if timing:
        moe_tiles(rows, block, gen, expert_bytes, bandwidth)


def moe_tiles(rows: list[dict], block: KimiSparseMoeBlock, gen: torch.Generator, expert_bytes: int,
              bandwidth: float, reps: int = 8) -> None:
    """A few other tiles of the two expert GEMV kernels at batch 1 and 32 (informational: the defaults in
    ``moe_decode_triton`` are the first row of each)."""
    from modeling_kimi_linear import moe_decode_triton as mdt

    gate_up = [mdt.GATE_UP_TILE, {"BLOCK_K": 256}, {"BLOCK_N": 32}, {"BLOCK_N": 32, "BLOCK_K": 256},
               {"num_stages": 3}, {"num_warps": 8, "BLOCK_K": 256}]
    down = [mdt.DOWN_TILE, {"BLOCK_N": 16}, {"BLOCK_N": 64}, {"BLOCK_K": 256}, {"BLOCK_N": 16, "BLOCK_K": 256},
            {"num_stages": 3}]
    hidden = block.experts.gate_up_proj.shape[-1]
    set_decode_kernels(block, "torch")
    for batch in (1, 32):
        xs = [torch.randn(batch, hidden, device="cuda", dtype=block.experts.gate_up_proj.dtype, generator=gen)
              for _ in range(reps)]
        routes = [block.gate(x) for x in xs]
        moved = sum(r[0].unique().numel() for r in routes) / reps * expert_bytes
        tries = [(g, {}) for g in gate_up] + [({}, d) for d in down[1:]]
        for gt, dt in tries:
            def call(gt=gt, dt=dt):
                return [mdt.experts(x, r[0], r[1], block.experts.gate_up_proj, block.experts.down_proj,
                                    gate_up_tile=gt, down_tile=dt) for x, r in zip(xs, routes)]

            try:
                ms = graph_time_ms(call) / reps
            except Exception as exc:  # a tile that does not compile (e.g. shared memory) is reported, not fatal
                rows.append({"check": f"  tile gate_up {gt} down {dt} (batch {batch}): failed: {exc}"[:300],
                             "rel_err": float("nan"), "info": True})
                continue
            rows.append({"check": f"  tile gate_up {gt or 'default'} down {dt or 'default'} (batch {batch}): "
                                  f"{ms * 1e3:.1f} us, {moved / (ms * 1e-3) / 1e12:.2f} TB/s "
                                  f"({moved / (ms * 1e-3) / bandwidth:.0%} of copy)",
                         "rel_err": ms * 1e3, "info": True})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_check.md / .json")
    parser.add_argument("--only", default="bare,layer,model,graph,moe,stability",
                        help="comma-separated checks to run, in this order (bare, layer, model, graph, moe, "
                             "stability)")
    parser.add_argument("--stability", default="32768,10000", help="prefill,decode-steps of the stability run "
                        "('0,0' skips it)")
    parser.add_argument("--traceback-after", type=float, default=0,
                        help="print every thread's stack after this many seconds (to see where a slow run is)")
    args = parser.parse_args(argv)
    if args.traceback_after:
        faulthandler.dump_traceback_later(args.traceback_after)
    rows: list[dict] = Rows()
    prefill, steps = (int(x) for x in args.stability.split(","))
    checks = {"bare": lambda: bare_op(rows), "layer": lambda: kda_layer_checks(rows), "model": lambda: model_level(rows),
              "graph": lambda: graph_decode(rows), "stability": lambda: steps and stability(rows, prefill, steps),
              "moe": lambda: moe_decode(rows)}
    names = args.only.split(",")
    unknown = [n for n in names if n not in checks]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {sorted(checks)}")
    if not torch.cuda.is_available() or (fla_kda_ops() is None and set(names) - {"moe"}):
        sys.exit("gpu_check needs a CUDA GPU, and flash-linear-attention for every check but moe (pip install "
                 "'fla-core>=0.5.1,<0.7')")
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
