"""Feed-forward blocks: the dense SwiGLU MLP and the sigmoid-routed mixture of experts.

In memory the routed experts are fused into two 3-D tensors (``experts.gate_up_proj [E, 2I, D]`` with the
gate rows first, ``experts.down_proj [E, D, I]``); the released checkpoint stores them one expert at a time
(``experts.{e}.w1/w3/w2.weight``). :mod:`checkpoint_layout` converts between the two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .kernels import hooked, linear_kind, linears, moe_decode_kernels, needs_grad, triton_decode
from .quantization import int8_rows, is_plain
from .quantized_experts import forward as quantized_experts_forward
from .quantized_experts import int8_kernels as quantized_int8_kernels

if TYPE_CHECKING:
    from .configuration_kimi_linear import KimiLinearConfig
    from .moe_decode_triton import SharedExpert


class KimiMLP(nn.Module):
    """SwiGLU MLP ``down(act(gate(x)) * up(x))`` (dense layers and the shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu",
                 decode_kernels: str = "auto") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]
        self.hidden_act = hidden_act
        self.decode_kernels = decode_kernels  # config.decode_kernels: int8 weights read as int8 at decode time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gate and up in one launch (6.7 us vs 10.5 for two cuBLAS calls at the release's shared-expert width on
        # an H100); down alone stays a module call (cuBLAS is faster for one projection with few output rows)
        gate, up = linears(self.decode_kernels, [(x, self.gate_proj), (x, self.up_proj)])
        return linears(self.decode_kernels, [(self.act_fn(gate) * up, self.down_proj)], kinds=("int8",))[0]

    def kernel_operands(self, x: torch.Tensor, kind: str):  # noqa: ANN201 - a moe_decode_triton.SharedExpert
        """This MLP's weights for the MoE decode kernels to compute it as a shared expert in the routed experts'
        launches (:class:`moe_decode_triton.SharedExpert`), or None where calling the module is what computes
        it: ``decode_kernels`` resolving to Triton for x's device, no hooks on this module, each projection a
        bias-free ``nn.Linear`` of :func:`kernels.linear_kind` ``kind`` (``"plain"``: x's dtype; ``"int8"``:
        weight-only int8 rows, zero points on all three or none), no gradient needed."""
        if not triton_decode(self.decode_kernels, x) or hooked(self):
            return None
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if any(linear_kind(x, m) != kind for m in projections) or needs_grad(x, *(m.weight for m in projections)):
            return None
        from .moe_decode_triton import SharedExpert

        if kind == "plain":
            return SharedExpert(*(m.weight for m in projections))
        rows = [int8_rows(m.weight) for m in projections]
        zeros = [r[2] for r in rows]
        if any(z is None for z in zeros) != all(z is None for z in zeros):
            return None
        return SharedExpert(*(r[0] for r in rows), scales=tuple(r[1] for r in rows),
                            zeros=None if zeros[0] is None else tuple(zeros))


class KimiMoEGate(nn.Module):
    """Router: fp32 scores, bias-corrected selection, grouped top-k, renormalisation and scaling."""

    def __init__(self, config: "KimiLinearConfig") -> None:
        super().__init__()
        self.top_k = config.num_experts_per_token
        self.num_experts = config.num_experts
        self.num_groups = config.num_expert_group
        self.topk_group = config.topk_group
        self.renormalize = config.moe_renormalize
        self.scaling = config.routed_scaling_factor
        self.activation = config.moe_router_activation_func
        self.weights_include_bias = config.router_weights_include_bias
        self.decode_kernels = getattr(config, "decode_kernels", "auto")
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        # Kept out of backprop, as in the release (a load-balancing bias adjusted outside the optimizer); still a
        # parameter so that checkpoints keep its released name.
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts), requires_grad=False)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Router scores from fp32 logits: sigmoid (the release) or softmax."""
        return torch.sigmoid(logits) if self.activation == "sigmoid" else logits.softmax(-1)

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert ids [N, k], bias-corrected scores [N, E])``: grouped top-k over the bias-corrected scores."""
        biased = scores + self.e_score_correction_bias.float()
        choice = biased
        if self.num_groups > 1:
            grouped = biased.unflatten(-1, (self.num_groups, -1))
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(-1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), 0.0).flatten(-2)
        return choice.topk(self.top_k, dim=-1).indices, biased

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [N, D]`` -> ``(expert ids [N, k], fp32 weights [N, k], fp32 router logits [N, E])``.

        A few CUDA tokens without autograd take the fused Triton router (:func:`moe_decode_triton.route`, chosen
        by :func:`kernels.moe_decode_kernels`): the same computation in two kernels."""
        ops = moe_decode_kernels(self.decode_kernels, x, x.shape[0] * self.top_k, self.weight)
        if ops is not None and ops.route_supported(x):
            return ops.route(
                x, self.weight, self.e_score_correction_bias, top_k=self.top_k, num_groups=self.num_groups,
                topk_group=self.topk_group, renormalize=self.renormalize, scaling=self.scaling,
                activation=self.activation, weights_include_bias=self.weights_include_bias,
            )
        logits = F.linear(x.float(), self.weight.float())
        scores = self.scores(logits)
        ids, biased = self.select(scores)
        # The released code weights experts with the bias-corrected scores (an in-place add on a view).
        weights = (biased if self.weights_include_bias else scores).gather(-1, ids)
        if self.top_k > 1 and self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling, logits

    def balance_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Load-balancing loss of one layer from its router logits ``[N, E]``: ``E * sum_e f_e * P_e`` with
        ``f_e`` the share of the N*k routing slots that went to expert e (no gradient) and ``P_e`` the mean of the
        scores normalised per token. 1.0 when routing is uniform."""
        scores = self.scores(logits.float())
        with torch.no_grad():
            ids, _ = self.select(scores)
            share = torch.bincount(ids.flatten(), minlength=self.num_experts).float() / ids.numel()
        probs = (scores / scores.sum(-1, keepdim=True)).mean(0)
        return self.num_experts * (share * probs).sum()


class KimiExperts(nn.Module):
    """All routed experts of one layer as two 3-D weights.

    Not transformers' experts functions (5.25 ``integrations/moe.py``: ``grouped_mm`` / ``batched_mm``, the same
    gate-rows-first layout and fp32 weighted sum): under autocast they cast the input to the weights' dtype (here the
    autocast dtype, as ``nn.Linear``), and they have no copy-free CPU decode path (batch 1, one CPU thread: our
    ``per_copy`` 0.06 / 0.87 ms against their grouped path's 0.12 / 1.17 ms at hidden 64 / 512, E 8 / 64).
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str,
        decode_kernels: str = "auto",
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.decode_kernels = decode_kernels  # config.decode_kernels: Triton decode kernels for CUDA tensors
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size))
        self.act_fn = ACT2FN[hidden_act]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` on ``x [n, D]``."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the chosen experts, accumulated in fp32 and returned in ``x.dtype``.

        Token copies are sorted by expert; one grouped matmul per projection runs every expert on its slice
        (no host synchronisation). Where grouped matmul has no backward (CPU training) each expert that received
        tokens runs once on its slice instead. A CPU decode step (fewer token copies than experts) runs the
        chosen experts one by one instead (see :meth:`per_copy`). Under autocast the products run in the autocast
        dtype, as ``nn.Linear`` layers do (autocast does not cover grouped matmul itself). A CUDA decode step
        (at most ``kernels.MOE_DECODE_MAX_COPIES`` token copies, no autograd) runs the Triton kernels of
        :func:`moe_decode_triton.experts` instead (each chosen expert's weights read once).
        """
        if not is_plain(self.gate_up_proj):  # int8 / float8 weights: see quantized_experts
            return quantized_experts_forward(self, x, ids, weights)
        out = self.kernel_sum(x, ids, weights)
        if out is not None:
            return out
        num_tokens, top_k = ids.shape
        gate_up, down = self.gate_up_proj, self.down_proj
        if x.device.type != "cpu" and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        if not x.is_cuda and not torch.is_grad_enabled() and ids.numel() <= gate_up.shape[0]:
            if torch.compiler.is_compiling():  # the ids cannot be read on the host inside a compiled graph
                return self.gathered(x, ids, weights)
            return self.per_copy(x, ids, weights)
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        token_of = order // top_k
        # scatter_add rather than bincount: CUDA's bincount reads the input's maximum back to the host
        counts = torch.zeros(gate_up.shape[0], dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        xs = x[token_of]
        if _grouped_mm_usable(x):
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = F.grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
            ys = F.grouped_mm(self.act_fn(gate) * up, down.transpose(-2, -1), offs=offs)
        else:
            outs, start = [], 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    outs.append(self.expert(e, xs[start : start + n]))
                    start += n
            ys = torch.cat(outs, 0)
        ys = ys.float() * weights.flatten()[order].unsqueeze(-1)
        out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token_of, ys).to(x.dtype)

    def kernel_sum(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   shared: "SharedExpert | None" = None) -> torch.Tensor | None:
        """The routed sum (plus ``shared``'s output) by the MoE decode kernels, or None where they do not serve
        this call (:func:`kernels.moe_decode_kernels`; int8 weights: :func:`quantized_experts.int8_kernels`)."""
        if not is_plain(self.gate_up_proj):
            return quantized_int8_kernels(self, x, ids, weights, shared)
        gate_up, down = self.gate_up_proj, self.down_proj
        copies = ids.numel() + (0 if shared is None else x.shape[0])
        ops = moe_decode_kernels(self.decode_kernels, x, copies, gate_up, down)
        if ops is None or not ops.experts_supported(x, gate_up, down, self.hidden_act):
            return None
        return ops.experts(x, ids, weights, gate_up, down, self.hidden_act, shared=shared)

    def with_shared(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    shared: "KimiMLP") -> torch.Tensor | None:
        """``self(x, ids, weights) + shared(x)`` computed by the MoE decode kernels in the same launches (the shared
        expert one more group of every token, its output added in fp32 before the one rounding to ``x.dtype``),
        or None where they do not serve this call: the kernels would not serve :meth:`forward` (bf16 / int8 rules
        as there), this module has hooks (a call, not this method, must run them), or ``shared`` is not a plain
        ``KimiMLP`` of this width and activation whose weights :meth:`KimiMLP.kernel_operands` gives."""
        if hooked(self) or type(shared) is not KimiMLP or shared.hidden_act != self.hidden_act:
            return None
        if shared.gate_proj.out_features != self.intermediate_size:
            return None
        operands = shared.kernel_operands(x, "plain" if is_plain(self.gate_up_proj) else "int8")
        return None if operands is None else self.kernel_sum(x, ids, weights, operands)

    def gathered(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same weighted sum for a few tokens with static shapes, for compiled decoding (no host read of the
        ids): the chosen experts' weights are gathered (a copy) and every (token, expert) pair runs as one batched
        product. Compiled on a CPU this beat both the eager :meth:`per_copy` and a copy-free broadcast-and-sum form,
        at the tiny width and at the release's (8 of 16 experts, hidden 2304: 15.8 ms against 25.5 and 18.5).
        ``x [N, D]``, ``ids`` / ``weights [N, k]`` -> ``[N, D]``."""
        num_tokens, top_k = ids.shape
        flat = ids.flatten()
        xs = x.repeat_interleave(top_k, 0).unsqueeze(1)  # [N*k, 1, D]
        gate, up = torch.bmm(xs, self.gate_up_proj[flat].transpose(1, 2)).chunk(2, dim=-1)
        ys = torch.bmm(self.act_fn(gate) * up, self.down_proj[flat].transpose(1, 2)).squeeze(1)  # [N*k, D]
        ys = ys.float() * weights.reshape(-1, 1)
        return ys.view(num_tokens, top_k, -1).sum(1).to(x.dtype)

    def per_copy(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same weighted sum for a few tokens on the CPU: each (token, expert) pair runs :meth:`expert` on
        views of that expert's weights (no weights are copied, and reading the ids costs no device sync).
        ``x [N, D]``, ``ids`` / ``weights [N, k]`` -> ``[N, D]``."""
        rows = []
        for n, (experts, w) in enumerate(zip(ids.tolist(), weights.unsqueeze(-1).unbind(0))):
            xn, acc = x[n : n + 1], None
            for j, e in enumerate(experts):
                y = self.expert(e, xn).float() * w[j]
                acc = y if acc is None else acc + y
            rows.append(acc)
        out = rows[0] if len(rows) == 1 else torch.cat(rows, 0)
        return out.to(x.dtype)


def _grouped_mm_usable(x: torch.Tensor) -> bool:
    """``F.grouped_mm`` exists, and either no gradient is needed or we are on CUDA (its CPU backward fails)."""
    return hasattr(F, "grouped_mm") and (x.is_cuda or not torch.is_grad_enabled())


class KimiSparseMoeBlock(nn.Module):
    """Routed experts plus shared experts: ``experts(x) + shared_experts(x)``."""

    def __init__(self, config: "KimiLinearConfig") -> None:
        super().__init__()
        self.gate = KimiMoEGate(config)
        self.experts = KimiExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, config.hidden_act,
            decode_kernels=getattr(config, "decode_kernels", "auto"),
        )
        if config.num_shared_experts:
            self.shared_experts = KimiMLP(
                config.hidden_size, config.moe_intermediate_size * config.num_shared_experts, config.hidden_act,
                decode_kernels=getattr(config, "decode_kernels", "auto"),
            )
        else:
            self.shared_experts = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, D]`` -> (``[B, T, D]``, router logits ``[B*T, E]``)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids, weights, logits = self.gate(x)
        out = None
        if self.shared_experts is not None and type(self.experts) is KimiExperts:  # not a wrapper (PEFT's)
            out = self.experts.with_shared(x, ids, weights, self.shared_experts)
        if out is None:  # the module calls (their hooks and wrappers included)
            out = self.experts(x, ids, weights)
            if self.shared_experts is not None:
                out = out + self.shared_experts(x)
        return out.view(shape), logits
