"""Where a decode step of the 48B-A3B layout spends its time, part by part, against each part's bytes.

The model (random bf16 weights, built on the GPU) decodes one token per sequence from a synthetic context (a real
``--prefill``-token prefill, the MLA latents repeated up to ``--context``). Each step is run op by op under
``torch.profiler`` with every part of the model inside a labelled range, so each kernel's device time is charged
to the part that launched it: KDA (projections, short convolution, gate, delta-rule step, gated norm, output
projection; or the fused decode step), MLA, router, experts (routed and shared together: the same launches compute
both where they can), norms, embedding, lm_head.
Next to it: the part's bytes (weights it reads at batch 1 plus the cache it reads and writes) over the copy
bandwidth measured in the same run, and the CUDA-graph step time (what ``generate()`` replays), whose excess over
the summed kernel times is launch and tail overhead between kernels. ``--kernels torch,triton`` profiles the same
model with ``config.decode_kernels`` set each way (the PyTorch reference path vs this package's Triton decode
kernels). ``--weights int8`` profiles torchao weight-only int8 weights (the roofline counts the bytes they store).

    python bench/gpu_profile.py --contexts 4096,1048576 --out $OUT
    python bench/gpu_profile.py --layers 16 --contexts 4096 --kernels triton --weights int8 --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

if __package__:  # kimi_linear_bench.gpu_profile (installed) or python -m bench.gpu_profile
    from .gpu import copy_bandwidth, log
    from .gpu_check_common import set_decode_kernels
    from .gpu_long_context import extend_cache
    from .gpu_scale import build_model, layout_config
    from .gpu_report import pdl_settings, programmatic_dependent_launch, save_report, versions_header
else:  # run as a script from a checkout (python bench/gpu_profile.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpu import copy_bandwidth, log  # type: ignore[no-redef]
    from gpu_check_common import set_decode_kernels  # type: ignore[no-redef]
    from gpu_long_context import extend_cache  # type: ignore[no-redef]
    from gpu_scale import build_model, layout_config  # type: ignore[no-redef]
    from gpu_report import (  # type: ignore[no-redef]
        pdl_settings, programmatic_dependent_launch, save_report, versions_header,
    )

from modeling_kimi_linear import kda_layer  # noqa: E402
from modeling_kimi_linear.cuda_graph_decode import decode_bucket  # noqa: E402
from modeling_kimi_linear.kda_layer import KimiDeltaAttention  # noqa: E402
from modeling_kimi_linear.mla_layer import KimiMLAAttention  # noqa: E402
from modeling_kimi_linear.moe import KimiExperts, KimiMoEGate, KimiSparseMoeBlock  # noqa: E402
from modeling_kimi_linear.presets import available_presets  # noqa: E402
from modeling_kimi_linear.quantization import tensor_bytes  # noqa: E402
from modeling_kimi_linear.transformers_compat import cache_field, output_cache  # noqa: E402

PARTS = ("kda: projections", "kda: short conv", "kda: gate", "kda: delta-rule step", "kda: gated norm",
         "kda: fused decode step", "kda: output projection", "mla", "router", "experts (routed + shared)",
         "dense MLP", "norms", "embedding", "lm_head")
_KDA_FUNCTIONS = {"short_conv": "kda: short conv", "kda": "kda: delta-rule step", "kda_padded": "kda: delta-rule step",
                  "kda_decode_step": "kda: fused decode step"}


def label(name: str) -> str:
    return f"part::{name}"


@contextlib.contextmanager
def labelled(model) -> None:  # noqa: ANN001
    """Wrap every part of ``model`` in a profiler range (module hooks, and the KDA layer's kernel functions)."""
    handles, saved = [], {}

    def wrap(module, part: str) -> None:  # noqa: ANN001
        ranges = []

        def pre(*_):  # noqa: ANN002
            ranges.append(record_function(label(part)))
            ranges[-1].__enter__()

        def post(*_):  # noqa: ANN002
            ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for module in model.modules():
        if isinstance(module, KimiDeltaAttention):  # its projections: split_projections, below (hooks on the
            wrap(module.o_proj, "kda: output projection")  # linears would send them back to module calls)
            wrap(module.o_norm, "kda: gated norm")
        elif isinstance(module, KimiMLAAttention):
            wrap(module, "mla")
        elif isinstance(module, KimiMoEGate):
            wrap(module, "router")
    for layer in model.model.layers:  # the decoder's norms: add_rms_norm, below (those inside attention count
        if hasattr(layer, "mlp"):     # with their layer; a hook on a norm would send it back to the module call)
            wrap(layer.mlp, "dense MLP")
    wrap(model.model.embed_tokens, "embedding")
    wrap(model.lm_head, "lm_head")
    decoder = sys.modules[type(model.model.layers[0]).__module__]
    targets = [(kda_layer, name, part) for name, part in _KDA_FUNCTIONS.items()]
    targets += [(decoder, "add_rms_norm", "norms"), (KimiDeltaAttention, "log_decay", "kda: gate"),
                (KimiDeltaAttention, "split_projections", "kda: projections"),  # a class: the wrapper is a method
                # the experts: no hooks either (a hooked KimiExperts keeps the shared expert out of its launches)
                (KimiExperts, "forward", "experts (routed + shared)"),
                (KimiExperts, "with_shared", "experts (routed + shared)")]
    for module in model.modules():  # a shared expert outside the experts' launches: its instance's forward
        if isinstance(module, KimiSparseMoeBlock) and module.shared_experts is not None:
            targets.append((module.shared_experts, "forward", "experts (routed + shared)"))
    for owner, name, part in targets:
        fn = getattr(owner, name, None)
        if fn is None:
            continue

        def ranged(*args, _fn=fn, _part=part, **kwargs):  # noqa: ANN002, ANN003
            with record_function(label(_part)):
                return _fn(*args, **kwargs)

        saved[owner, name] = fn
        setattr(owner, name, ranged)
    try:
        yield
    finally:
        for (owner, name), fn in saved.items():
            if isinstance(owner, torch.nn.Module):  # an instance attribute over the class's method
                delattr(owner, name)
            else:
                setattr(owner, name, fn)
        for h in handles:
            h.remove()


def part_bytes(model, context: int) -> dict[str, float]:  # noqa: ANN001
    """Bytes each part must move for one token at batch 1."""
    cfg = model.config
    out: dict[str, float] = defaultdict(float)
    element = model.model.embed_tokens.weight.element_size()  # activations and caches

    def size(params) -> int:  # noqa: ANN001 - bytes stored (quantized weights: data and scales)
        return sum(tensor_bytes(p) for p in params)

    for module in model.modules():
        if isinstance(module, KimiDeltaAttention):
            for name, p in module.named_parameters():
                part = ("kda: output projection" if name.startswith("o_proj") else "kda: projections"
                        if name.endswith("proj.weight") else "kda: fused decode step")
                out[part] += tensor_bytes(p)
            out["kda: fused decode step"] += cfg.kda_num_heads * cfg.kda_head_dim ** 2 * 4 * 2  # state read + write
        elif isinstance(module, KimiMLAAttention):
            out["mla"] += size(module.parameters())
            out["mla"] += context * cfg.mla_latent_dim * element
        elif isinstance(module, KimiMoEGate):
            out["router"] += size(module.parameters())
        elif isinstance(module, KimiExperts):
            out["experts (routed + shared)"] += size(module.parameters()) * cfg.num_experts_per_token / cfg.num_experts
        elif isinstance(module, KimiSparseMoeBlock) and module.shared_experts is not None:
            out["experts (routed + shared)"] += size(module.shared_experts.parameters())
    for layer in model.model.layers:
        out["norms"] += size(p for norm in (layer.input_layernorm, layer.post_attention_layernorm)
                             for p in norm.parameters())
        if hasattr(layer, "mlp"):
            out["dense MLP"] += size(layer.mlp.parameters())
    out["norms"] += model.model.norm.weight.numel() * element
    out["embedding"] = cfg.hidden_size * element
    out["lm_head"] = tensor_bytes(model.lm_head.weight)
    return out


_LAUNCH_WORDS = ("Launch", "Memcpy", "Memset")  # host-side CUDA runtime / driver calls that start device work


def charge_kernels(events, steps: int) -> tuple[dict[str, float], float]:
    """Device time per step of each labelled part, and of all kernels, from ``prof.profiler.kineto_results.events()``.

    A kernel's ``correlation_id`` is that of the runtime or driver call that launched it (``cudaLaunchKernel``,
    ``cuLaunchKernelEx``...), a host event with the same id; its ``linked_correlation_id`` names the aten op around
    that call, and is 0 for a kernel Triton launched (no aten op around it). Each kernel is charged to the innermost
    ``part::`` host range holding its launch call (the linked op where no launch call is found), else to
    ``"(no part)"``. (Read off an H100 run's event dump: 668 of 821 kernels had no linked op.)"""
    cpu = torch.autograd.DeviceType.CPU
    ranges, ops, launches, kernels = [], {}, {}, []
    for e in events:
        name = e.name()
        if e.device_type() == cpu:
            if name.startswith("part::"):
                ranges.append((e.start_ns(), e.end_ns(), name.removeprefix("part::")))
            elif any(word in name for word in _LAUNCH_WORDS):
                launches[e.correlation_id()] = e.start_ns()
            else:
                ops[e.correlation_id()] = e.start_ns()
        elif not name.startswith("part::") and not e.is_user_annotation():
            kernels.append((e.correlation_id(), e.linked_correlation_id(), e.duration_ns()))
    parts: dict[str, float] = defaultdict(float)
    total = 0.0
    for corr, link, duration in kernels:
        us = duration / 1e3 / steps
        total += us
        at = launches.get(corr, ops.get(link) if link else None)
        inside = [r for r in ranges if at is not None and r[0] <= at <= r[1]]
        parts[min(inside, key=lambda r: r[1] - r[0])[2] if inside else "(no part)"] += us
    return parts, total


def pdl_suffix() -> str:
    """``_pdl`` in the names of files written with programmatic dependent launch on."""
    return "_pdl" if os.environ.get("KIMI_LINEAR_PDL", "0") == "1" else ""


@torch.no_grad()
def profile_context(model, context: int, args, bw: float) -> list[dict]:  # noqa: ANN001
    ids = torch.randint(3, model.config.vocab_size, (1, args.prefill), device="cuda")
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    extend_cache(cache, context, decode_bucket(context + 64))
    token = out.logits[:, -1:].argmax(-1)
    rows = []
    for choice in args.kernels:
        set_decode_kernels(model, choice)
        model.cuda_graph_decode = False
        for _ in range(3):  # warm: compile / autotune outside the profile
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        with labelled(model), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        events = prof.profiler.kineto_results.events()
        parts, kernels_total = charge_kernels(events, args.steps)
        if args.dump_events:
            dump = [[e.name()[:80], str(e.device_type()), e.start_ns(), e.end_ns(), e.correlation_id(),
                     e.linked_correlation_id(), e.is_user_annotation()] for e in events]
            Path(args.out).mkdir(parents=True, exist_ok=True)
            name = f"events_{context}_{choice}{pdl_suffix()}.json"
            (Path(args.out) / name).write_text(json.dumps(dump[: args.dump_events]))
        model.cuda_graph_decode = True
        for _ in range(3):
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        graph_us = 1e6 * (time.perf_counter() - start) / args.steps
        nbytes = part_bytes(model, context)
        for part in PARTS + ("(no part)",):
            if parts.get(part) or nbytes.get(part):
                roof = 1e6 * nbytes.get(part, 0.0) / bw
                rows.append({"context": context, "kernels": choice, "part": part,
                             "device_us": round(parts.get(part, 0.0), 1), "roofline_us": round(roof, 1)})
        core = ("kda: short conv", "kda: gate", "kda: delta-rule step", "kda: gated norm", "kda: fused decode step")
        rows.append({"context": context, "kernels": choice, "part": "kda: all between projections (sum of the above)",
                     "device_us": round(sum(parts.get(p, 0.0) for p in core), 1),
                     "roofline_us": round(1e6 * nbytes.get("kda: fused decode step", 0.0) / bw, 1)})
        rows.append({"context": context, "kernels": choice, "part": "all kernels (sum)",
                     "device_us": round(kernels_total, 1), "roofline_us": round(1e6 * sum(nbytes.values()) / bw, 1)})
        rows.append({"context": context, "kernels": choice, "part": "CUDA-graph step (wall)",
                     "device_us": round(graph_us, 1), "roofline_us": round(1e6 * sum(nbytes.values()) / bw, 1)})
        log(f"context {context}, decode_kernels={choice}: graph step {graph_us:.0f} us, kernels {kernels_total:.0f} us")
        if args.trace:
            prof.export_chrome_trace(str(Path(args.out) / f"trace_{context}_{choice}{pdl_suffix()}.json"))
    return rows


class StepClock:
    """Timestamps of ``generate()``'s decode steps, to split its time per token into the CUDA-graph replay, the
    device work ``generate()`` queues after it (token selection, stopping criteria), and the time the device waits
    for the host between steps: transformers reads the stop flag back every step (``StopCheck.__call__``), so the
    device idles from then until the next replay is launched.

    While active it wraps ``torch.cuda.CUDAGraph.replay`` (CUDA events around each replay, host time at its launch),
    transformers' ``StopCheck.__call__`` (a CUDA event queued before its read-back, host time when it returns) and
    the model's own steps on the way to the next replay (host times at ``forward``, ``StaticDecoder.step`` and its
    model check), so the host's share is split too."""

    MARKS = ("forward", "step", "check", "checked")

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._stops: list[tuple] = []
        self._marks: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def active(self, model):  # noqa: ANN001, ANN201
        from transformers.generation import utils as generation

        from modeling_kimi_linear.cuda_graph_decode import StaticDecoder

        stop_check = generation.StopCheck  # transformers >= 5.24: the per-step read-back of the stop flag
        saved = [(torch.cuda.CUDAGraph, "replay"), (stop_check, "__call__"), (type(model), "forward"),
                 (StaticDecoder, "step"), (StaticDecoder, "_check_model")]
        originals = {key: getattr(*key) for key in saved}
        replay, stop = originals[saved[0]], originals[saved[1]]

        def timed_replay(graph, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            launched = time.perf_counter()
            start.record()
            result = replay(graph, *args, **kwargs)
            end.record()
            self.steps.append({"start": start, "end": end, "launched": launched})
            return result

        def timed_stop(owner, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            reached, entered = torch.cuda.Event(enable_timing=True), time.perf_counter()
            reached.record()
            result = stop(owner, *args, **kwargs)
            self._stops.append((reached, time.perf_counter(), entered))
            return result

        def marked(fn, tag: str, after: str | None = None):  # noqa: ANN001, ANN202
            def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003
                self._marks.append((tag, time.perf_counter()))
                result = fn(*args, **kwargs)
                if after:
                    self._marks.append((after, time.perf_counter()))
                return result
            return wrapper

        setattr(*saved[0], timed_replay)
        setattr(*saved[1], timed_stop)
        setattr(*saved[2], marked(originals[saved[2]], "forward"))
        setattr(*saved[3], marked(originals[saved[3]], "step"))
        setattr(*saved[4], marked(originals[saved[4]], "check", "checked"))
        try:
            yield self
        finally:
            for key, fn in originals.items():
                setattr(*key, fn)

    def summary(self) -> dict[str, float]:
        """Medians in microseconds over the steps between two replays. Device: ``replay``, ``after`` (work queued
        after the replay, up to the stop flag's read-back), ``idle`` (waiting for the host) and ``period`` (one
        replay's start to the next). Host, from the read-back's return to the next launch: ``host``, split into
        ``host: transformers`` (up to the model's ``forward``), ``host: model before step``, ``host: step before
        check``, ``host: model check`` and ``host: check to launch``; and ``host: launch to stop check`` (the host's
        work after a launch: when it exceeds ``replay``, something in it waited for the device)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        keys = ("replay", "after", "idle", "period", "host", "host: transformers", "host: model before step",
                "host: step before check", "host: model check", "host: check to launch", "host: launch to stop check")
        rows: dict[str, list[float]] = {k: [] for k in keys}
        for step, following in zip(self.steps, self.steps[1:]):
            stops = [s for s in self._stops if step["launched"] < s[1] < following["launched"]]
            if len(stops) != 1:  # the last step of a generate() call, or a step without a stop check
                continue
            reached, returned, entered = stops[0]
            period = step["start"].elapsed_time(following["start"]) * 1e3
            replay = step["start"].elapsed_time(step["end"]) * 1e3
            after = step["end"].elapsed_time(reached) * 1e3
            rows["replay"].append(replay)
            rows["after"].append(after)
            rows["idle"].append(period - replay - after)
            rows["period"].append(period)
            rows["host"].append((following["launched"] - returned) * 1e6)
            rows["host: launch to stop check"].append((entered - step["launched"]) * 1e6)
            marks = {tag: t for tag, t in self._marks if returned < t < following["launched"]}
            if set(marks) == set(self.MARKS):
                points = [returned] + [marks[m] for m in self.MARKS] + [following["launched"]]
                for key, a, b in zip(keys[5:10], points, points[1:]):
                    rows[key].append((b - a) * 1e6)
        return {k: round(statistics.median(v), 1) for k, v in rows.items() if v} | {"steps": len(rows["period"])}


def synchronizing_calls(fn) -> list[str]:  # noqa: ANN001
    """The distinct places (file:line of the Python call) that make the host wait for the device while ``fn``
    runs, as reported by ``torch.cuda.set_sync_debug_mode('warn')``."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{w.filename}:{w.lineno}"
            places[where] = places.get(where, 0) + 1
    return [f"{where} ({n} times)" for where, n in places.items()]


@torch.no_grad()
def generate_anatomy(model, context: int, args) -> list[dict]:  # noqa: ANN001
    """Where ``generate()``'s time per token goes beyond the CUDA-graph step (see :class:`StepClock`), at batch 1
    from a synthetic ``context``, with the Triton decode kernels."""
    set_decode_kernels(model, "triton")
    model.cuda_graph_decode = True
    ids = torch.randint(3, model.config.vocab_size, (1, args.prefill), device="cuda")
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    n = args.generate_steps
    extend_cache(cache, context - 2 * n - 8, decode_bucket(context))
    full = torch.cat([ids, ids.new_zeros(1, context - 2 * n - 8 - args.prefill), out.logits[:, -1:].argmax(-1)], 1)

    def run(ids: torch.Tensor) -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_field(cache),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=model.config.pad_token_id)

    full = run(full)  # captures the bucket's graph
    clock = StepClock()
    with clock.active(model):
        run(full)
    got = clock.summary()
    log(f"context {context}, generate(): {got}")
    for where in synchronizing_calls(lambda: run(full)):
        log(f"  synchronizes the host with the device, each step: {where}")
    names = {"period": "one decode step (device, replay to replay)", "replay": "CUDA-graph replay (device)",
             "after": "token selection and stop check (device, after the replay)",
             "idle": "device idle, waiting for the host", "host": "host, stop flag read back to the next launch"}
    return [{"context": context, "kernels": "triton", "part": "generate(): " + names.get(key, key),
             "device_us": value, "roofline_us": 0.0} for key, value in got.items() if key != "steps"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="kimi_linear_48b_a3b", choices=available_presets())
    parser.add_argument("--contexts", default="4096,1048576")
    parser.add_argument("--kernels", default="torch,triton", help="decode_kernels settings to profile, in order")
    parser.add_argument("--layers", type=int, default=None,
                        help="cut the layout to this many layers (3 KDA : 1 MLA kept), e.g. to fit an 80 GB GPU")
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--generate-steps", type=int, default=48,
                        help="decode steps of the generate() anatomy per context (0: skip it)")
    parser.add_argument("--dump-events", type=int, default=0,
                        help="write the first N profiler events per context and setting (name, device, times, "
                             "correlation ids) to events_<context>_<kernels>.json, to check the charging")
    parser.add_argument("--trace", action="store_true", help="also write a chrome trace per context and setting")
    parser.add_argument("--pdl", type=pdl_settings, default=[False],
                        help="profile with this package's Triton kernels launched without ('off', the default) and "
                             "/ or with ('on') programmatic dependent launch, e.g. off,on")
    parser.add_argument("--weights", default="bf16", choices=["bf16", "int8", "int8-head", "float8"],
                        help="torchao weight-only int8 / float8 (routed experts included), quantized layer by layer "
                             "as the model is made (bench/gpu_scale.py --weights)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    args.kernels = args.kernels.split(",")
    if not torch.cuda.is_available():
        sys.exit("gpu_profile needs a CUDA GPU")
    bw = copy_bandwidth()
    torch.manual_seed(0)
    model = build_model(layout_config(args.preset, "hybrid", args.layers), torch.device("cuda"), torch.bfloat16,
                        args.weights)
    rows = []
    for context, pdl in itertools.product((int(c) for c in args.contexts.split(",")), args.pdl):
        with programmatic_dependent_launch(model, pdl):
            found = profile_context(model, context, args, bw)
            if args.generate_steps:
                found += generate_anatomy(model, context, args)
        rows += [{**r, "pdl": pdl} for r in found]
    cut = f" cut to {args.layers} layers" if args.layers else ""
    head = versions_header(f"bf16 ({args.weights} weights), batch 1, preset {args.preset}{cut}; copy bandwidth "
                           f"{bw / 1e12:.2f} TB/s")
    lines = [head, "", "| context | decode_kernels | PDL | part | device time per step (us) | roofline (us) | x "
             "roofline |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['device_us'] / r['roofline_us']:.1f}" if r["roofline_us"] else "-"
        lines.append(f"| {r['context']} | {r['kernels']} | {'on' if r['pdl'] else 'off'} | {r['part']} | "
                     f"{r['device_us']} | {r['roofline_us']} | {ratio} |")
    save_report(args.out, "gpu_profile", "\n".join(lines), head, rows)


if __name__ == "__main__":
    main()
