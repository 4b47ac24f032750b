"""GPU checks of this package's Triton decode kernels (run through bench/gpu_check.py: ``--only kdastep,mla,moe``):
each against the PyTorch path on the same bf16 inputs at the release's width, and timed."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from unittest import mock

import torch

if __package__:  # kimi_linear_bench (installed) or python -m bench.gpu_check
    from .gpu import copy_bandwidth
    from .gpu_check_common import T0, check_config, pair, rel, replay_us, set_decode_kernels
else:  # imported by bench/gpu_check.py run as a script from a checkout
    from gpu import copy_bandwidth  # type: ignore[no-redef]
    from gpu_check_common import (  # type: ignore[no-redef]
        T0, check_config, pair, rel, replay_us, set_decode_kernels,
    )

from modeling_kimi_linear.moe import KimiSparseMoeBlock  # noqa: E402


def int8_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per output row (torchao's int8 weight-only layout, zero point 0):
    ``(q [..., N, K] int8, scale [..., N, 1])`` with ``w ~ q * scale``."""
    scale = w.float().abs().amax(-1, keepdim=True) / 127
    return (w.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


@torch.no_grad()
def kda_decode_step_checks(rows: list[dict]) -> None:
    """The fused KDA decode step (``decode_kernels="triton"``, one Triton kernel between the projections and
    ``o_proj``) against the fla path (``decode_kernels="torch"``: PyTorch conv update and gate math, fla's
    fused_recurrent_kda and gated norm) and the PyTorch path, one KDA layer at full width in bf16: a left-padded
    prefill of 2 x 300 tokens, then 32 decode steps (one with a padded token), outputs every step and the cached
    states at the end. Then the time of one layer step (CUDA-graph replays, cache updated in place) both ways, at
    batch 1 and 8, the projections + o_proj alone (what the two paths share), the kernel alone at 4 and 8 warps
    (over copies of the state, so that each call reads it from memory) and, at batch 1, by programs a head."""
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
        # the kernel-alone times below step over enough copies of the state that each call reads its state from
        # memory, as a decode step does (one state read back to back would sit in L2: 50 MB on an H100)
        copies = [(conv, state)] + [(conv.clone(), state.clone())
                                    for _ in range(min(63, -(-(96 << 20) // state.nbytes) - 1))]
        turn = iter(range(1 << 30))

        def step(warps: int, split: int | None = None, rotate: bool = False):  # noqa: ANN202
            conv_i, state_i = copies[next(turn) % len(copies)] if rotate else (conv, state)
            return kda_decode_triton.kda_decode_step(
                q, k, v, f, b, gate, (fused.q_conv1d.weight, fused.k_conv1d.weight, fused.v_conv1d.weight),
                fused.A_log, fused.dt_bias, fused.o_norm.weight, fused.o_norm.variance_epsilon, conv_i, state_i,
                in_place=True, num_warps=warps, split_v=split)

        def kernel_us(warps: int, split: int | None = None) -> float:
            return replay_us(lambda: step(warps, split, rotate=True), repeats=2 * len(copies))

        default_split = kda_decode_triton.split_plan(bsz * fused.num_heads, fused.head_dim,
                                                     torch.cuda.get_device_properties(0).multi_processor_count)
        kernel = {(w, default_split): kernel_us(w) for w in (4, 8)}  # (16 warps: slowest on an H100, not timed)
        rows.append({"check": f"  fused kernel alone ({len(copies)} states in turn), B={bsz}, {default_split} "
                              f"programs a head, us per call at 4 / 8 warps (default "
                              f"{kda_decode_triton.DEFAULT_NUM_WARPS}): "
                              + " / ".join(f"{kernel[w, default_split]:.1f}" for w in (4, 8)),
                     "rel_err": kernel[kda_decode_triton.DEFAULT_NUM_WARPS, default_split], "info": True})
        if bsz == 1:  # (at batch 8 every split was slower on an H100; each variant is a compile on a fresh machine)
            splits = [s for s in (1, 2, 4, 8) if s != default_split]
            found = {(w, s): kernel_us(w, s) for s in splits for w in (2, 4)}
            rows.append({"check": "  same by programs a head (split_v) at 2 / 4 warps: "
                                  + ", ".join(f"{s}: {found[2, s]:.1f} / {found[4, s]:.1f}" for s in splits),
                         "rel_err": min(found.values()), "info": True})
        conv0, state0 = conv.clone(), state.clone()  # one step split and one not, from the same state: same values
        split_out = [t.clone() for t in step(4, 8)]
        conv.copy_(conv0)
        state.copy_(state0)
        whole_out = step(4, 1)
        rows.append({"check": f"  fused kernel, B={bsz}: 8 programs a head vs 1 (output, state, tail)",
                     "rel_err": max(rel(x, y) for x, y in zip(split_out, whole_out))})


@torch.no_grad()
def mla_decode_check(rows: list[dict]) -> None:
    """The MLA flash-decoding kernel (``decode_kernels="triton"``) against the PyTorch latent path of the same
    layer (release shape: 32 heads, 512 + 64 latent, bf16), one new token, at 4K / 128K / 1M cached rows (batch 1)
    and a left-padded batch of 4 at 128K attending over a view of a larger buffer, as a CUDA-graph step does.
    Times (``triton.testing.do_bench``, median, L2 flushed between runs): the kernel alone, as latent bytes / time
    and as a share of the copy bandwidth measured here; the layer's whole latent attention (query absorption,
    attention, value projection) on both paths. At 1M rows every launch configuration in ``CONFIGS`` is timed."""
    from triton.testing import do_bench

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
        if bsz == 1 and rows_n < 1 << 20:  # short contexts: fewer tiles a split, more splits (the 4K profile:
            from modeling_kimi_linear import mla_decode_triton as mdt  # 18.3 us for 4.7 MB with 4 tiles a split)

            saved, found = mdt.MIN_TILES_PER_SPLIT, []
            # timed inside a CUDA graph (eager launches cost this host more than the kernel takes at 4K), over
            # enough distinct latent buffers that they do not stay in L2 between calls, as in a decode step
            lats = [latent] + [torch.randn_like(latent) for _ in range(min(31, -(-(96 << 20) // nbytes) - 1))]
            turn = iter(range(1 << 30))

            def one_call(config=None) -> torch.Tensor:  # noqa: ANN001
                lat = lats[next(turn) % len(lats)]
                return mla_decode_attention(q_lat, lat, valid, layer.scaling, layer.kv_lora_rank, config=config)

            # by tiles a split with the default tile, then smaller tiles (more splits: at 4K the default's 64
            # one-tile splits leave half of an H100's 132 SMs idle)
            default = default_config(torch.bfloat16)
            smaller = [c for c in CONFIGS if c.block_s < default.block_s]
            for config, min_tiles in [(default, n) for n in (1, 2, 4, 8)] + [(c, 1) for c in smaller]:
                with mock.patch.object(mdt, "MIN_TILES_PER_SPLIT", min_tiles):
                    us = replay_us(lambda c=config: one_call(c), repeats=2 * len(lats))
                    splits = mdt.split_plan(rows_n, 1, mdt.sm_count(latent.device), config.block_s)
                label = (f"{min_tiles}" if config == default else
                         f"1, {config.block_s}-row tiles{', kv-major' if config.kv_major else ''}, "
                         f"{config.num_stages} stages")
                found.append(f"{label} ({splits} splits): {us:.1f} us ({nbytes / (us * 1e-6) / bw:.0%})")
            rows.append({"check": f"  kernel alone in a CUDA graph, {len(lats)} latent buffers in turn, by "
                                  f"MIN_TILES_PER_SPLIT (default {saved}, {default.block_s}-row tiles): "
                                  + ", ".join(found), "info": True, "rel_err": 0.0})
            del lats
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


RELEASE_CONFIG = Path(__file__).resolve().parent.parent / "configuration" / "kimi_linear_48b_a3b.json"


def graph_time_ms(fn, iters: int = 20) -> float:
    """Milliseconds per call of ``fn`` (which makes several block calls, see :func:`moe_decode`), from CUDA-graph
    replays."""
    return replay_us(fn, repeats=1, iters=iters) / 1e3


@torch.no_grad()
def moe_decode(rows: list[dict], batches=(1, 8, 32), reps: int = 8, device: str = "cuda",
               dtype: torch.dtype = torch.bfloat16, config=None, timing: bool = True, tiles: bool = False) -> None:
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
        set_decode_kernels(block, "triton")
        if block.shared_experts is not None:  # the shared expert as its own module calls (cuBLAS), as before fusion
            block.shared_experts.decode_kernels = "torch"
            times["triton_shared_apart", "block"] = graph_time_ms(lambda: [block(x) for x in xs]) / reps
            block.shared_experts.decode_kernels = "triton"
        achieved = moved / (times["triton", "experts"] * 1e-3)
        rows.append({
            "check": f"  time per call (us, a time): block torch {times['torch', 'block'] * 1e3:.1f} / triton "
                     f"{times['triton', 'block'] * 1e3:.1f} (shared expert in the experts' launches; apart: "
                     f"{times.get(('triton_shared_apart', 'block'), float('nan')) * 1e3:.1f}); experts torch {times['torch', 'experts'] * 1e3:.1f} / "
                     f"triton {times['triton', 'experts'] * 1e3:.1f}; {distinct:.1f} distinct experts = "
                     f"{moved / 1e6:.1f} MB -> triton experts {achieved / 1e12:.2f} TB/s "
                     f"({achieved / bandwidth:.0%} of copy), torch "
                     f"{moved / (times['torch', 'experts'] * 1e-3) / 1e12:.2f} TB/s (batch {batch})",
            "rel_err": times["triton", "block"] * 1e3, "info": True, "batch": batch,
            "times_us": {f"{p}_{part}": t * 1e3 for (p, part), t in times.items()},
            "distinct_experts": distinct, "expert_bytes": moved, "triton_experts_tb_s": achieved / 1e12,
            "copy_tb_s": bandwidth / 1e12,
        })
    if timing and 1 in batches:  # the router's decode tile against the tile it replaced (untimed when written)
        from modeling_kimi_linear import moe_decode_triton as mdt

        x1 = torch.randn(1, hidden, device=device, dtype=dtype, generator=gen)
        gate = block.gate
        kwargs = dict(top_k=cfg.num_experts_per_token, num_groups=cfg.num_expert_group, topk_group=cfg.topk_group,
                      renormalize=cfg.moe_renormalize, scaling=cfg.routed_scaling_factor,
                      activation=cfg.moe_router_activation_func, weights_include_bias=cfg.router_weights_include_bias)
        found = []
        saved = mdt.ROUTER_DECODE_BLOCK_E, mdt.ROUTER_DECODE_BLOCK_D, mdt.ROUTER_DECODE_WARPS
        want = mdt.route(x1, gate.weight, gate.e_score_correction_bias, **kwargs)
        for block_e, block_d, warps in ((2, 1024, 4), (2, 1024, 1), (2, 1024, 2), (1, 2048, 4), (1, 2048, 1),
                                        (4, 512, 1), (8, 256, 1)):
            with mock.patch.multiple(mdt, ROUTER_DECODE_BLOCK_E=block_e, ROUTER_DECODE_BLOCK_D=block_d,
                                     ROUTER_DECODE_WARPS=warps):
                us = graph_time_ms(lambda: mdt.route(x1, gate.weight, gate.e_score_correction_bias, **kwargs)) * 1e3
                got = mdt.route(x1, gate.weight, gate.e_score_correction_bias, **kwargs)
            same = torch.equal(got[0].sort(-1).values, want[0].sort(-1).values)
            found.append(f"({block_e}, {block_d}, {warps}) {us:.1f}{'' if same else ' (other experts!)'}")
        rows.append({"check": "  router at batch 1, us per call (experts a program, K block, warps; default "
                              f"{saved}): " + ", ".join(found), "rel_err": 0.0, "info": True})
    if timing and tiles:  # the tile sweep (minutes on a fresh machine): gpu_check --only moetiles
        moe_tiles(rows, block, gen, expert_bytes, bandwidth)


def moe_tiles(rows: list[dict], block: KimiSparseMoeBlock, gen: torch.Generator, expert_bytes: int,
              bandwidth: float, reps: int = 8) -> None:
    """A few other tiles of the two expert GEMV kernels at batch 1 and 32 (informational: the defaults in
    ``moe_decode_triton`` are the first row of each)."""
    from modeling_kimi_linear import moe_decode_triton as mdt

    gate_up = [mdt.GATE_UP_TILE, {"BLOCK_K": 256}, {"BLOCK_N": 16}, {"BLOCK_K": 64}, {"BLOCK_N": 64, "BLOCK_K": 64,
               "num_stages": 3}, {"num_stages": 3}, {"num_warps": 8, "BLOCK_K": 256}]
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


@torch.no_grad()
def multi_linear_check(rows: list[dict]) -> None:
    """Several linear maps in one Triton launch (``kernels.linears`` -> ``multi_linear_triton``) against the module
    calls, at the release's width in bf16: a KDA layer's eight projections (q, k, v, f_a, beta, g_a from x, then
    f_b and g_b from the ranks; two launches), an MLA layer's two (q_proj, kv_a_proj_with_mqa) and the shared
    expert's gate and up. Per group and batch 1 / 8: the worst output's error, both times (CUDA-graph replays) and
    the launch's share of the copy bandwidth; then int8 weights (per-row scales, built here) for KDA's six
    projections and single o_proj / down_proj against bf16 cuBLAS; then a few tiles for the KDA group at batch 1."""
    from modeling_kimi_linear import multi_linear_triton
    from modeling_kimi_linear.kda_layer import KimiDeltaAttention
    from modeling_kimi_linear.kernels import linears
    from modeling_kimi_linear.mla_layer import KimiMLAAttention
    from modeling_kimi_linear.moe import KimiMLP
    from modeling_kimi_linear.presets import load_preset

    cfg = load_preset("kimi_linear_48b_a3b")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def built(module: torch.nn.Module) -> torch.nn.Module:
        module = module.to("cuda", torch.bfloat16)
        for p in module.parameters():
            p.data = (torch.randn(p.shape, device="cuda", generator=gen) * 0.02).to(p.dtype)
        return module

    kda, mla = built(KimiDeltaAttention(cfg, 0)), built(KimiMLAAttention(cfg, 3))
    mlp = built(KimiMLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act))
    groups = {
        "KDA q/k/v/f_a/beta/g_a + f_b/g_b": lambda x, ch: [
            *(first := linears(ch, [(x, kda.q_proj), (x, kda.k_proj), (x, kda.v_proj), (x, kda.f_a_proj),
                                    (x, kda.b_proj), (x, kda.g_a_proj)])),
            *linears(ch, [(first[3], kda.f_b_proj), (first[5], kda.g_b_proj)])],
        "MLA q_proj + kv_a_proj_with_mqa": lambda x, ch: linears(ch, [(x, mla.q_proj), (x, mla.kv_a_proj_with_mqa)]),
        "shared expert gate + up": lambda x, ch: linears(ch, [(x, mlp.gate_proj), (x, mlp.up_proj)]),
    }
    weights = {"KDA q/k/v/f_a/beta/g_a + f_b/g_b": [kda.q_proj, kda.k_proj, kda.v_proj, kda.f_a_proj, kda.b_proj,
                                                    kda.g_a_proj, kda.f_b_proj, kda.g_b_proj],
               "MLA q_proj + kv_a_proj_with_mqa": [mla.q_proj, mla.kv_a_proj_with_mqa],
               "shared expert gate + up": [mlp.gate_proj, mlp.up_proj]}
    bandwidth = copy_bandwidth()
    for name, fn in groups.items():
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in weights[name])
        for bsz in (1, 8):
            x = torch.randn(bsz, 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
            err = max(rel(a, b) for a, b in zip(fn(x, "triton"), fn(x, "torch")))
            rows.append({"check": f"multi-linear launch vs module calls: {name}, B={bsz} (worst output)",
                         "rel_err": err})
            t_mod, t_tri = replay_us(lambda: fn(x, "torch")), replay_us(lambda: fn(x, "triton"))
            share = nbytes / (t_tri * 1e-6) / bandwidth  # bytes read, against the copy's bytes read + written
            rows.append({"check": f"  same, us (graph replay; a time, not an error): module calls {t_mod:.1f}, "
                                  f"one launch per group {t_tri:.1f} ({t_mod / t_tri:.2f}x); {nbytes / 1e6:.1f} MB "
                                  f"of weights at {share:.0%} of the copy bandwidth",
                         "rel_err": t_tri, "info": True})
    x = torch.randn(1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
    pairs = [(x, m.weight) for m in weights["KDA q/k/v/f_a/beta/g_a + f_b/g_b"][:6]]
    tiles = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for n, k, w, s in
             ((64, 128, 8, 3), (64, 128, 4, 3), (32, 128, 4, 4), (16, 128, 4, 4), (32, 256, 4, 3), (16, 256, 4, 4),
              (64, 64, 4, 4), (32, 128, 8, 4), (64, 256, 8, 3), (64, 128, 8, 4))]
    times = [replay_us(lambda t=t: multi_linear_triton.multi_linear(pairs, tile=t)) for t in tiles]
    int8_groups = {"KDA's six projections from x": weights["KDA q/k/v/f_a/beta/g_a + f_b/g_b"][:6],
                   "KDA o_proj alone": [kda.o_proj], "shared expert down_proj alone": [mlp.down_proj]}
    for name, mods in int8_groups.items():
        qs, scales, want, inputs = [], [], [], []
        for m in mods:
            xin = torch.randn(1, m.in_features, device="cuda", dtype=torch.bfloat16, generator=gen)
            q, scale = int8_per_row(m.weight)
            qs.append(q)
            scales.append(scale)
            inputs.append(xin)
            want.append(torch.nn.functional.linear(xin, (q.float() * scale).to(torch.bfloat16)))
        pairs_q = list(zip(inputs, qs))
        got = multi_linear_triton.multi_linear(pairs_q, scales=scales)
        err = max(rel(a, b) for a, b in zip(got, want))
        t_q = replay_us(lambda: multi_linear_triton.multi_linear(pairs_q, scales=scales))
        t_bf = replay_us(lambda: [m(xin) for m, xin in zip(mods, inputs)])
        nbytes = sum(q.numel() for q in qs)
        rows.append({"check": f"int8 launch vs bf16 product of the dequantized weights: {name}, B=1", "rel_err": err})
        rows.append({"check": f"  same, us: int8 launch {t_q:.1f} ({nbytes / 1e6:.1f} MB at "
                              f"{nbytes / (t_q * 1e-6) / bandwidth:.0%} of copy; tile "
                              f"{multi_linear_triton.choose_tile([q.shape[0] for q in qs], True, x.device)}), bf16 "
                              f"cuBLAS {t_bf:.1f} (int8 / bf16 = {t_q / t_bf:.2f})", "rel_err": t_q, "info": True})
    rows.append({"check": "  KDA's six projections from x, B=1, us per tile (BLOCK_N, BLOCK_K, warps, stages): "
                          + ", ".join(f"{tuple(t.values())} {u:.1f}" for t, u in zip(tiles, times))
                          + f" (default {tuple(multi_linear_triton.TILE.values())})",
                 "rel_err": min(times), "info": True})
    # one projection with few output rows (o_proj: 2304 x 4096): 16-row tiles leave one program an SM, so the
    # bytes in flight per SM are one tile's stages; wider K blocks put more in flight
    xo = torch.randn(1, kda.o_proj.in_features, device="cuda", dtype=torch.bfloat16, generator=gen)
    q_o, scale_o = int8_per_row(kda.o_proj.weight)
    t_cublas = replay_us(lambda: kda.o_proj(xo))
    for label_, kw in (("bf16", {}), ("int8", {"scales": [scale_o]})):
        w_o = q_o if kw else kda.o_proj.weight
        found = []
        want = torch.nn.functional.linear(xo, (q_o.float() * scale_o).to(torch.bfloat16) if kw else w_o)
        default = multi_linear_triton.choose_tile([w_o.shape[0]], bool(kw), xo.device, k=w_o.shape[1])
        for n, k, w, st, sp in ((16, 256, 8, 3, 1), (16, 128, 8, 3, 1), (16, 256, 8, 3, 2), (16, 256, 8, 3, 4),
                                (16, 128, 8, 3, 4), (16, 256, 4, 3, 4), (16, 128, 4, 4, 4), (16, 256, 8, 3, 8),
                                (16, 512, 8, 3, 4), (32, 256, 8, 3, 4), (16, 1024, 8, 3, 1)):
            tile = dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st, SPLIT=sp)
            try:
                fn = (lambda t=tile: multi_linear_triton.multi_linear([(xo, w_o)], tile=t, **kw)[0])
                err = rel(fn(), want)
                us = replay_us(fn)
                found.append(f"{(n, k, w, st, sp)} {us:.1f}" + (f" (error {err:.1e})" if err > 1e-2 else ""))
            except Exception as exc:  # noqa: BLE001 - a tile over the shared-memory limit: report, go on
                found.append(f"{(n, k, w, st, sp)} failed ({type(exc).__name__})")
        rows.append({"check": f"  KDA o_proj alone ({label_} weights), B=1, us per tile (BLOCK_N, BLOCK_K, warps, "
                              f"stages, SPLIT), against {t_cublas:.1f} for the bf16 cuBLAS call; default "
                              f"{tuple(default.values())}: " + ", ".join(found),
                     "rel_err": t_cublas, "info": True})
    gemv_forms(rows, kda, mlp, weights["KDA q/k/v/f_a/beta/g_a + f_b/g_b"][:6], cfg, gen, bandwidth)


def gemv_forms(rows: list[dict], kda, mlp, six: list, cfg, gen: torch.Generator, bandwidth: float) -> None:  # noqa: ANN001
    """One token: the multi-linear launch's element-wise form (``GEMV``) against its padded ``tl.dot`` and the bf16
    cuBLAS calls, int8 and bf16 weights: KDA's six projections from x, a single o_proj, the shared expert's
    down_proj, and an lm_head of the release's size (int8). Errors against the dot form; times in CUDA graphs."""
    from modeling_kimi_linear import multi_linear_triton as m

    lm_q = torch.randint(-127, 128, (cfg.vocab_size, cfg.hidden_size), device="cuda", dtype=torch.int8, generator=gen)
    lm_scale = torch.rand(cfg.vocab_size, device="cuda", generator=gen) * 1e-3
    cases = {"KDA's six from x": six, "KDA o_proj alone": [kda.o_proj], "shared expert down_proj alone":
             [mlp.down_proj], "lm_head": None}
    for name, mods in cases.items():
        for quant in (True, False):
            if mods is None and not quant:
                continue  # the bf16 head stays a cuBLAS call
            if mods is None:
                xs = [torch.randn(1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)]
                ws, kw = [lm_q], {"scales": [lm_scale]}
                cublas = (lambda w=(lm_q.float() * lm_scale[:, None]).to(torch.bfloat16), x=xs[0]:
                          torch.nn.functional.linear(x, w))
            else:
                xs = [torch.randn(1, mod.in_features, device="cuda", dtype=torch.bfloat16, generator=gen)
                      for mod in mods]
                packed = [int8_per_row(mod.weight) for mod in mods] if quant else None
                ws = [q for q, _ in packed] if quant else [mod.weight for mod in mods]
                kw = {"scales": [sc for _, sc in packed]} if quant else {}
                cublas = (lambda mods=mods, xs=xs: [mod(x) for mod, x in zip(mods, xs)])
            pairs = list(zip(xs, ws))
            want = m.multi_linear(pairs, tile={"GEMV": False}, **kw)
            nbytes = sum(w.numel() * w.element_size() for w in ws)
            found = [f"cuBLAS bf16 {replay_us(cublas):.1f}"]
            for label, tile in (("dot", {"GEMV": False}), ("GEMV", {"GEMV": True}),
                                ("GEMV pipelined 3", {"GEMV": True, "GEMV_STAGES": 3}),
                                *((f"GEMV {n}x{k} {w}w", {"GEMV": True, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w})
                                  for n, k, w in ((16, 256, 4), (32, 256, 4), (64, 256, 8), (16, 512, 4),
                                                  (32, 512, 8)))):
                try:
                    def call(t=tile):  # noqa: ANN202
                        return m.multi_linear(pairs, tile=t, **kw)

                    err = max(rel(a, b) for a, b in zip(call(), want))
                    us = replay_us(call)
                    found.append(f"{label} {us:.1f} ({nbytes / (us * 1e-6) / bandwidth:.0%})"
                                 + (f" error {err:.1e}!" if err > 1e-2 else ""))
                except Exception as exc:  # noqa: BLE001 - a tile that does not fit: report, go on
                    found.append(f"{label} failed ({type(exc).__name__})")
            rows.append({"check": f"  one token, {name}, {'int8' if quant else 'bf16'} weights ({nbytes / 1e6:.1f} "
                                  f"MB), us (share of copy): " + ", ".join(found), "rel_err": 0.0, "info": True})
    del lm_q


@torch.no_grad()
def rms_norm_check(rows: list[dict]) -> None:
    """The decoder's residual add + RMSNorm as one Triton launch (``kernels.add_rms_norm`` ->
    ``rms_norm_triton``) against the add and ``KimiRMSNorm`` (the PyTorch path), bf16 at the release's width
    (2304), for 1, 8 and 4096 rows: both results' errors and both times (CUDA-graph replays). Then MLA's latent
    row (``kernels.rms_norm_head``: 512 of 576 values normed) the same way."""
    from modeling_kimi_linear.kernels import add_rms_norm, rms_norm_head
    from modeling_kimi_linear.norms import KimiRMSNorm

    gen = torch.Generator(device="cuda").manual_seed(0)
    norm = KimiRMSNorm(2304, eps=1e-6).to("cuda", torch.bfloat16)
    norm.weight.data = (1 + 0.1 * torch.randn(2304, device="cuda", generator=gen)).to(torch.bfloat16)
    for n in (1, 8, 4096):
        x, res = (torch.randn(n, 1, 2304, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        (y_t, h_t), (y_p, h_p) = add_rms_norm("triton", x, res, norm), add_rms_norm("torch", x, res, norm)
        rows.append({"check": f"residual add + RMSNorm, one launch vs PyTorch, {n} rows: output (new residual "
                              f"exact: {bool(torch.equal(h_t, h_p))})", "rel_err": rel(y_t, y_p)
                     + (0.0 if torch.equal(h_t, h_p) else float("inf"))})
        t_p, t_t = replay_us(lambda: add_rms_norm("torch", x, res, norm)), replay_us(
            lambda: add_rms_norm("triton", x, res, norm))
        rows.append({"check": f"  same, us (graph replay; a time, not an error): PyTorch {t_p:.1f}, one launch "
                              f"{t_t:.1f} ({t_p / t_t:.1f}x)", "rel_err": t_t, "info": True})
    latent_norm = KimiRMSNorm(512, eps=1e-6).to("cuda", torch.bfloat16)
    latent_norm.weight.data = (1 + 0.1 * torch.randn(512, device="cuda", generator=gen)).to(torch.bfloat16)
    for n in (1, 8):  # MLA's latent: kv_a_proj_with_mqa's [B, 1, 576] output, 512 values normed, 64 kept
        kv = torch.randn(n, 1, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
        got, want = rms_norm_head("triton", kv, 512, latent_norm), rms_norm_head("torch", kv, 512, latent_norm)
        rows.append({"check": f"MLA latent norm + shared key part, one launch vs PyTorch, {n} rows",
                     "rel_err": rel(got, want)})
        t_p, t_t = (replay_us(lambda c=c: rms_norm_head(c, kv, 512, latent_norm)) for c in ("torch", "triton"))
        rows.append({"check": f"  same, us (graph replay; a time, not an error): PyTorch {t_p:.1f}, one launch "
                              f"{t_t:.1f} ({t_p / t_t:.1f}x)", "rel_err": t_t, "info": True})


@torch.no_grad()
def moe_int8_check(rows: list[dict], batches=(1, 8), reps: int = 8) -> None:
    """The MoE expert kernels on per-row int8 weights (torchao's int8 weight-only layout, built here from random
    bf16 weights at the release's width: int8 data, fp32 scale per output row, zero point 0) against the same
    kernels on the dequantized bf16 weights and against ``quantized_experts``' PyTorch path; times (CUDA-graph
    replays of ``reps`` tokens) and the share of the copy bandwidth for the int8 bytes the step reads."""
    from types import SimpleNamespace

    from modeling_kimi_linear import KimiLinearConfig
    from modeling_kimi_linear import moe_decode_triton as mdt
    from modeling_kimi_linear.quantized_experts import _gathered

    cfg = KimiLinearConfig.from_json_file(str(RELEASE_CONFIG))
    gen = torch.Generator(device="cuda").manual_seed(0)
    experts, hidden, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    quantized = {}
    for name, shape in (("gate_up", (experts, 2 * inter, hidden)), ("down", (experts, hidden, inter))):
        w = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        q, scale = int8_per_row(w)
        quantized[name] = (q, scale, torch.zeros_like(q[..., :1]))
        del w
    deq = {name: ((q.float() - z.float()) * s).to(torch.bfloat16) for name, (q, s, z) in quantized.items()}
    view = SimpleNamespace(gate_up_proj=deq["gate_up"], down_proj=deq["down"], act_fn=torch.nn.functional.silu)
    bandwidth = copy_bandwidth()
    for batch in batches:
        xs = [torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(reps)]
        routes = []
        for _ in range(reps):
            scores = torch.rand(batch, experts, device="cuda", generator=gen)
            ids = scores.topk(cfg.num_experts_per_token, -1).indices
            routes.append((ids, torch.rand(batch, ids.shape[1], device="cuda", generator=gen)))

        def int8_call(x, r):
            (gq, gs, gz), (dq, ds, dz) = quantized["gate_up"], quantized["down"]
            return mdt.experts(x, r[0], r[1], gq, dq, gate_up_scale=gs, down_scale=ds, gate_up_zero=gz,
                               down_zero=dz)

        with mock.patch.object(mdt, "GEMV_ONE_TOKEN", False):  # the padded dot: the GEMV rows' reference too
            got = int8_call(xs[0], routes[0])
            on_bf16 = mdt.experts(xs[0], routes[0][0], routes[0][1], deq["gate_up"], deq["down"])
        torch_path = _gathered(view, xs[0], routes[0][0], routes[0][1])
        rows.append({"check": f"MoE experts on int8 weights vs the same kernels on the dequantized bf16 weights "
                              f"(batch {batch})", "rel_err": rel(got, on_bf16)})
        rows.append({"check": f"  same, vs quantized_experts' PyTorch path (batch {batch})",
                     "rel_err": rel(got, torch_path)})
        distinct = sum(r[0].unique().numel() for r in routes) / reps
        moved = distinct * 3 * hidden * inter  # one byte a weight (scales: 0.1%)
        with mock.patch.object(mdt, "GEMV_ONE_TOKEN", False):  # the padded dot, whatever the default
            t_int8 = graph_time_ms(lambda: [int8_call(x, r) for x, r in zip(xs, routes)]) / reps
            t_bf16 = graph_time_ms(lambda: [mdt.experts(x, r[0], r[1], deq["gate_up"], deq["down"])
                                            for x, r in zip(xs, routes)]) / reps
        t_torch = graph_time_ms(lambda: [_gathered(view, x, r[0], r[1]) for x, r in zip(xs, routes)]) / reps
        if batch == 1:  # the one-token element-wise form (GEMV_ONE_TOKEN) against the padded dot, both weights
            for stages in (1, 3):  # GEMV_STAGES: its loads unpipelined, then pipelined 3 deep
                with mock.patch.multiple(mdt, GEMV_ONE_TOKEN=True, GEMV_STAGES=stages):
                    err_gemv = max(rel(int8_call(xs[0], routes[0]), got),
                                   rel(mdt.experts(xs[0], routes[0][0], routes[0][1], deq["gate_up"], deq["down"]),
                                       on_bf16))
                    g_int8 = graph_time_ms(lambda: [int8_call(x, r) for x, r in zip(xs, routes)]) / reps
                    g_bf16 = graph_time_ms(lambda: [mdt.experts(x, r[0], r[1], deq["gate_up"], deq["down"])
                                                    for x, r in zip(xs, routes)]) / reps
                rows.append({"check": f"  one token, element-wise form (GEMV, {stages} stages) vs padded dot: outputs",
                             "rel_err": err_gemv})
                rows.append({"check": f"  one token, us per call (a time): int8 GEMV ({stages} stages) "
                                      f"{g_int8 * 1e3:.1f} vs dot {t_int8 * 1e3:.1f} "
                                      f"({moved / (g_int8 * 1e-3) / bandwidth:.0%} vs "
                                      f"{moved / (t_int8 * 1e-3) / bandwidth:.0%} of copy); bf16 GEMV "
                                      f"{g_bf16 * 1e3:.1f} vs dot {t_bf16 * 1e3:.1f}", "rel_err": g_int8 * 1e3,
                             "info": True})
        if batch == batches[0]:
            int8_tiles(rows, xs, routes, quantized, moved, bandwidth)
        rows.append({"check": f"  us per call (a time): int8 kernels {t_int8 * 1e3:.1f} ({moved / 1e6:.1f} MB at "
                              f"{moved / (t_int8 * 1e-3) / bandwidth:.0%} of copy), bf16 kernels "
                              f"{t_bf16 * 1e3:.1f} (int8 / bf16 = {t_int8 / t_bf16:.2f}), gather-and-dequantize "
                              f"PyTorch path {t_torch * 1e3:.1f} (batch {batch})",
                     "rel_err": t_int8 * 1e3, "info": True})


def int8_tiles(rows: list[dict], xs, routes, quantized: dict, moved: float, bandwidth: float) -> None:  # noqa: ANN001
    """A few tiles of the expert kernels on int8 weights (the defaults were tuned for bf16; an int8 tile of the same
    shape moves half the bytes): informational rows, the defaults first."""
    from modeling_kimi_linear import moe_decode_triton as mdt

    (gq, gs, gz), (dq, ds, dz) = quantized["gate_up"], quantized["down"]
    # deeper pipelines: an int8 stage holds half a bf16 stage's bytes, so 4 stages keep half the bytes in flight
    # (sm_90 SASS: the same cp.async copies and mma.sync per stage, the int8 -> bf16 widening done by byte permutes
    # and packed half adds, no conversion-unit instructions: bench/kernel_sass.py --kernels experts)
    tries = [({}, {}), ({"num_stages": 6}, {"num_stages": 6}), ({"num_stages": 8}, {"num_stages": 8}),
             ({"BLOCK_K": 256}, {"BLOCK_K": 256}), ({"BLOCK_K": 256, "num_stages": 6}, {"BLOCK_K": 256, "num_stages": 6}),
             ({"BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 3}, {"BLOCK_N": 64}), ({"BLOCK_K": 64}, {})]
    for gt, dt in tries:
        def call(gt=gt, dt=dt):
            return [mdt.experts(x, r[0], r[1], gq, dq, gate_up_tile=gt, down_tile=dt, gate_up_scale=gs,
                                down_scale=ds, gate_up_zero=gz, down_zero=dz) for x, r in zip(xs, routes)]

        try:
            ms = graph_time_ms(call) / len(xs)
        except Exception as exc:  # a tile that does not compile (e.g. shared memory) is reported, not fatal
            rows.append({"check": f"  int8 tile gate_up {gt} down {dt}: failed: {exc}"[:300], "rel_err": float("nan"),
                         "info": True})
            continue
        rows.append({"check": f"  int8 tile gate_up {gt or 'default'} down {dt or 'default'}: {ms * 1e3:.1f} us "
                              f"({moved / (ms * 1e-3) / bandwidth:.0%} of copy)", "rel_err": ms * 1e3, "info": True})
