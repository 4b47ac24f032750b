"""The bytes one decode step must move, counted from a model's parameters and configuration: the numerator of the
benches' bandwidth rooflines (``gpu_scale.py``, ``gpu_quant.py``); the roofline is these bytes over the copy
bandwidth measured in the same run (docs/benchmarks.md)."""

from __future__ import annotations

from modeling_kimi_linear import KimiLinearForCausalLM
from modeling_kimi_linear.quantization import tensor_bytes


class StepBytes:
    """What one decode step of ``model`` reads: every weight once, except the routed experts (only those the step
    routes to) and the embedding (one row a token); a quantized weight counts what it stores (data and scales).
    Caches: every MLA layer's latent rows, every KDA layer's fp32 state read and written."""

    def __init__(self, model: KimiLinearForCausalLM) -> None:
        cfg = model.config
        self.experts = self.other = 0
        for name, p in model.named_parameters():
            size = tensor_bytes(p)
            if ".experts." in name:  # the routed experts (the shared expert's names read "shared_experts.")
                self.experts += size
            elif "embed_tokens" in name:
                self.other += size // p.shape[0]  # one row a token
            else:
                self.other += size
        self.moe_layers = sum(hasattr(layer, "block_sparse_moe") for layer in model.model.layers)
        self.num_experts, self.top_k = cfg.num_experts or 1, cfg.num_experts_per_token or 1
        element = model.model.embed_tokens.weight.element_size()  # the activations' (and caches') dtype
        self.latent_per_token = len(cfg.mla_layers) * cfg.mla_latent_dim * element
        self.kda_state = len(cfg.kda_layers) * cfg.kda_num_heads * cfg.kda_head_dim ** 2 * 4 * 2  # read + write

    def weights(self, expert_share: float | None = None) -> float:
        """Weight bytes of one step: ``expert_share`` of the routed experts (default: batch 1's top-k of E)."""
        share = self.top_k / self.num_experts if expert_share is None else expert_share
        return self.other + share * self.experts

    def step(self, batch: int, context: int, expert_share: float | None = None) -> float:
        """Bytes of one step of ``batch`` sequences at ``context`` cached tokens: :meth:`weights` plus the caches."""
        return self.weights(expert_share) + batch * (context * self.latent_per_token + self.kda_state)
