"""Kimi Linear decoder, base model and causal-LM head (transformers-compatible, CPU and GPU).

Layer ``i`` mixes tokens with KDA (:mod:`kda_layer`) or MLA (:mod:`mla_layer`) as the config says and mixes
channels with a dense SwiGLU (``mlp``) or the routed MoE (``block_sparse_moe``, :mod:`moe`). There is no
positional encoding anywhere: position ids are only read to find packed documents.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .atomic_write import write_atomically
from .cache_kimi_linear import KimiLinearCache
from .checkpoint_layout import conversion_registered, released_state_dict
from .configuration_kimi_linear import KimiLinearConfig
from .compiled_decode import CompiledDecoder
from . import decode_guard
from .cuda_graph_decode import StaticDecoder
from .device_placement import weights_on_one_device
from .kda_layer import KimiDeltaAttention
from .kernels import add_rms_norm, linears
from .mla_layer import KimiMLAAttention
from .transformers_compat import CACHE_FIELD, build_output, cache_field, one_cache, output_cache
from .moe import KimiExperts, KimiMLP, KimiMoEGate, KimiSparseMoeBlock
from .norms import KimiGatedRMSNorm, KimiRMSNorm
from .quantization import default_key_accepted, graph_capture_blocker, prepare_quantization_config, tensor_bytes


class KimiDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``h += mixer(norm(h)); h += ffn(norm(h))``."""

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_kda = config.is_kda_layer(layer_idx)
        self.decode_kernels = getattr(config, "decode_kernels", "auto")  # the norms' Triton launch on CUDA
        if self.is_kda:
            self.self_attn = KimiDeltaAttention(config, layer_idx)
        else:
            self.self_attn = KimiMLAAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.block_sparse_moe = KimiSparseMoeBlock(config)
        else:
            self.mlp = KimiMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                               decode_kernels=getattr(config, "decode_kernels", "auto"))
        self.input_layernorm = KimiRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = KimiRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: KimiLinearCache | None = None,
        branch: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(branch', residual', router logits)``: the layer's output is ``residual' + branch'``, left unadded so
        that the next norm adds it in its own launch. ``branch`` is the previous layer's unadded output (None: the
        input is ``hidden_states`` alone)."""
        # each norm with the residual add before it: one Triton launch at decode time on CUDA (kernels.add_rms_norm)
        if branch is None:
            hidden_states, residual = add_rms_norm(self.decode_kernels, hidden_states, None, self.input_layernorm)
        else:
            hidden_states, residual = add_rms_norm(self.decode_kernels, branch, hidden_states, self.input_layernorm)
        if self.is_kda:
            hidden_states = self.self_attn(hidden_states, token_mask, past_key_values, cu_seqlens)
        else:
            hidden_states = self.self_attn(hidden_states, attn_mask, past_key_values)
        hidden_states, residual = add_rms_norm(self.decode_kernels, hidden_states, residual,
                                               self.post_attention_layernorm)
        router_logits = None
        if hasattr(self, "block_sparse_moe"):
            hidden_states, router_logits = self.block_sparse_moe(hidden_states)
        else:
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual, router_logits


class KimiLinearPreTrainedModel(PreTrainedModel):
    """Weight init, checkpoint layout (load released names, save released names) and transformers flags."""

    config_class = KimiLinearConfig
    config: KimiLinearConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["KimiDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _keep_in_fp32_modules_strict = ["A_log", "dt_bias"]
    _supports_sdpa = True
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model creates its own KimiLinearCache.
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, (KimiRMSNorm, KimiGatedRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, KimiDeltaAttention):
            # per-head decay rate exp(A_log) ~ U(1, 16); dt = softplus(dt_bias) log-uniform in [1e-3, 1e-1]
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(1.0, 16.0).log())
            dt = torch.empty_like(module.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            bound = 1.0 / math.sqrt(module.conv_size)
            for conv in (module.q_conv1d, module.k_conv1d, module.v_conv1d):
                init.uniform_(conv.weight, -bound, bound)
        elif isinstance(module, KimiExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, KimiMoEGate):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained`` that also reads the released per-expert tensor names (and
        directories saved by native transformers). Weights are read from safetensors only.

        A ``quantization_config`` (``TorchAoConfig``, ``BitsAndBytesConfig``) also covers the routed experts and
        keeps the weights the math reads directly in high precision unless the caller says otherwise
        (:func:`quantization.prepare_quantization_config`)."""
        kwargs.setdefault("use_safetensors", True)
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = prepare_quantization_config(kwargs["quantization_config"])
        with conversion_registered(cls.__name__), default_key_accepted():
            return super().from_pretrained(*args, **kwargs)

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of the parameters (and buffers) as stored: a quantized tensor counts its data, scales and zero
        points (transformers' own count takes a torchao tensor at its nominal dtype's size)."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(tensor_bytes(t) for t in tensors)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save with the released tensor names (per-expert ``w1``/``w2``/``w3``, dense layers as ``mlp.*``),
        which Moonshot's code, vLLM and native transformers load."""
        if kwargs.get("state_dict") is None and kwargs.pop("save_original_format", True):
            kwargs["state_dict"] = released_state_dict(self.state_dict())
        kwargs["save_original_format"] = False
        super().save_pretrained(save_directory, *args, **kwargs)
        _complete_auto_map(Path(save_directory) / "config.json")


def _complete_auto_map(config_path: Path) -> None:
    """Point ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` at our classes whichever of them was saved:
    the config transformers writes names only the saved class, and one loaded from a released checkpoint still
    names Moonshot's modules (``modeling_kimi.KimiLinearModel``) for the others, files the saved folder lacks."""
    if not config_path.is_file():
        return
    data = json.loads(config_path.read_text())
    auto_map = data.setdefault("auto_map", {})
    auto_map["AutoConfig"] = "configuration_kimi_linear.KimiLinearConfig"
    auto_map["AutoModel"] = "modeling_kimi_linear.KimiLinearModel"
    auto_map["AutoModelForCausalLM"] = "modeling_kimi_linear.KimiLinearForCausalLM"
    write_atomically(config_path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


class KimiLinearModel(KimiLinearPreTrainedModel):
    """Embeddings, the hybrid decoder stack and the final norm."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__(config)
        pad = config.pad_token_id if config.pad_token_id is not None and config.pad_token_id < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, pad)
        self.layers = nn.ModuleList(KimiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = KimiRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.decode_kernels = getattr(config, "decode_kernels", "auto")  # the final add + norm's Triton launch
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KimiLinearCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: KimiLinearCache | None = None,
        **kwargs: Any,
    ) -> MoeModelOutputWithPast:
        """Run the decoder.

        Args:
            attention_mask: ``[B, past + T]`` (or ``[B, T]``) with 0 at padding. Padded tokens change no KDA state
                and are never attended to.
            position_ids: only used to detect packed documents (positions restarting at 0, batch size 1).
            past_key_values / cache: a :class:`KimiLinearCache` (either name: transformers >= 5.24 passes
                ``cache``); created when ``use_cache`` and none is given.
            cu_seqlens: ``[N+1]`` boundaries of documents packed along T (batch size 1); also read from the
                ``cu_seq_lens_q`` kwarg that ``DataCollatorWithFlattening`` emits.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache_given = use_cache
        if use_cache is None:  # a training forward keeps no cache unless asked (it would only cost memory)
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_router_logits = (
            self.config.output_router_logits if output_router_logits is None else output_router_logits
        )
        past_key_values = one_cache(cache, past_key_values)
        if past_key_values is not None and not isinstance(past_key_values, KimiLinearCache):
            raise TypeError(
                f"past_key_values must be a KimiLinearCache (got {type(past_key_values).__name__}); "
                "pass none and the model creates one"
            )
        cache_asked = use_cache_given is True or past_key_values is not None
        if use_cache and past_key_values is None:
            past_key_values = KimiLinearCache(self.config)
        if not use_cache:
            past_key_values = None

        bsz, seqlen, _ = inputs_embeds.shape
        if cu_seqlens is None:
            cu_seqlens = kwargs.get("cu_seq_lens_q")
        if past_key_values is not None and past_key_values.graph_step is not None:
            # a static decode step (cuda_graph_decode, compiled_decode): masks come from device-side inputs, and
            # the Python token counter is not read (a compiled step would otherwise be specialised on it)
            token_mask, attn_mask = past_key_values.graph_step.masks()
        else:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            token_mask, attn_mask, cu_seqlens = build_masks(
                attention_mask, position_ids, cu_seqlens, bsz, seqlen, past, inputs_embeds.device
            )
        if cu_seqlens is not None and past_key_values is not None:
            if cache_asked:
                raise ValueError(
                    "packed sequences (cu_seqlens / restarting position_ids) cannot be used with a cache: a cache "
                    "holds one continuing sequence per row; pass use_cache=False (and no cache) for packed documents"
                )
            past_key_values = None  # packed documents and no cache asked for: the default cache is not built

        # each layer's output is kept as (residual stream, branch) and added by the next norm (one launch at decode)
        hidden_states, branch = inputs_embeds, None
        all_hidden: list[torch.Tensor] = []
        all_router: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states if branch is None else hidden_states + branch)
            branch, hidden_states, router_logits = layer(hidden_states, token_mask, attn_mask, cu_seqlens,
                                                         past_key_values, branch)
            if output_router_logits and router_logits is not None:
                all_router.append(router_logits)
        x, residual = (hidden_states, None) if branch is None else (branch, hidden_states)
        hidden_states = add_rms_norm(self.decode_kernels, x, residual, self.norm)[0]
        if output_hidden_states:
            all_hidden.append(hidden_states)
        if past_key_values is not None:
            past_key_values.advance(seqlen)
        return build_output(
            MoeModelOutputWithPast,
            last_hidden_state=hidden_states,
            **cache_field(past_key_values),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            router_logits=tuple(all_router) if output_router_logits else None,
        )


def build_masks(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    bsz: int,
    seqlen: int,
    past: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Return ``(token_mask [B, T] for KDA, bool attention mask [B, 1, T, past+T] for MLA, cu_seqlens)``.

    ``None`` entries mean "nothing to mask": no padding, and plain causal attention without a cache.
    """
    keys_valid = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [batch, length], got shape {tuple(attention_mask.shape)}")
        mask = attention_mask.to(device=device, dtype=torch.bool)
        if mask.shape[1] == seqlen and past:
            mask = torch.cat([mask.new_ones(bsz, past), mask], 1)
        if mask.shape[1] != past + seqlen:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns; expected {past + seqlen} (cached + new tokens)"
            )
        # Looking at the mask costs a host sync on a GPU: worth it before a prefill (it saves an explicit
        # attention mask), not on every decode step, where masking with an all-ones mask is cheap.
        check = seqlen > 1 or mask.device.type == "cpu"
        if not check or not bool(mask.all()):
            keys_valid = mask
    token_mask = keys_valid[:, past:] if keys_valid is not None else None
    if token_mask is not None and (seqlen > 1 or token_mask.device.type == "cpu") and bool(token_mask.all()):
        token_mask = None

    if cu_seqlens is None and position_ids is not None and bsz == 1 and seqlen > 1 and keys_valid is None:
        pos = position_ids.reshape(-1).to(device)
        starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
        if starts.numel():
            cu_seqlens = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), seqlen)])
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.long)
        if bsz != 1 or int(cu_seqlens[-1]) != seqlen or int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} must run from 0 to T={seqlen} with batch size 1")
        if cu_seqlens.numel() == 2:
            cu_seqlens = None

    if keys_valid is None and cu_seqlens is None and (past == 0 or seqlen == 1):
        # plain causal attention, or one new token that sees everything: no mask needed
        return token_mask, None, None
    q_pos = torch.arange(past, past + seqlen, device=device)
    k_pos = torch.arange(past + seqlen, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None]).unsqueeze(0)  # [1, T, S]
    if cu_seqlens is not None:
        doc = torch.zeros(seqlen, dtype=torch.long, device=device)
        doc[cu_seqlens[1:-1]] = 1
        doc = doc.cumsum(0)
        allowed = allowed & (doc[:, None] == doc[None, :]).unsqueeze(0)
    if keys_valid is not None:
        allowed = allowed & keys_valid[:, None, :]
        # a padded query may see nothing; let it see itself so softmax stays finite (its output is unused)
        allowed = allowed | (k_pos[None, :] == q_pos[:, None]).unsqueeze(0)
    return token_mask, allowed.unsqueeze(1), cu_seqlens


#: kwargs generate() passes to a decode step that :meth:`KimiLinearForCausalLM.prepare_inputs_for_generation`
#: forwards as they are (anything else takes transformers' general path).
_DECODE_STEP_KWARGS = frozenset(
    {"use_cache", "logits_to_keep", "position_ids", "output_attentions", "output_hidden_states", "output_router_logits"}
)


class KimiLinearForCausalLM(KimiLinearPreTrainedModel, GenerationMixin):
    """Kimi Linear with a language-modelling head; plugs into ``generate()`` and ``Trainer``.

    Decode steps on CUDA (one new token per sequence, a cache holding the prompt, no autograd) are captured and
    replayed as CUDA graphs (:mod:`cuda_graph_decode`): on an H200 a step of an 8-layer full-width model took 2.8 ms
    against 26 ms op by op, with the same greedy tokens (``bench/gpu_check.py --only graph``, ``bench/gpu.py``).
    ``model.cuda_graph_decode = False`` decodes op by op.

    On a CPU, ``model.compile_cpu_decode = True`` runs decode steps as one ahead-of-time compiled C++ program
    (:mod:`compiled_decode`): several times faster per token, at tens of seconds of compiling the first time a
    model shape is seen (later processes load the program from disk in about a second).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    cuda_graph_decode: bool = True
    compile_cpu_decode: bool = False

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__(config)
        self.model = KimiLinearModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def router_balance_loss(self, router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean over the MoE layers of :meth:`KimiMoEGate.balance_loss` (``router_logits`` as returned with
        ``output_router_logits=True``, one entry per MoE layer in order)."""
        gates = [layer.block_sparse_moe.gate for layer in self.model.layers if hasattr(layer, "block_sparse_moe")]
        losses = [gate.balance_loss(logits) for gate, logits in zip(gates, router_logits)]
        return torch.stack([l.to(losses[0].device) for l in losses]).mean()

    @torch.no_grad()
    def warmup(self, batch_size: int = 1, padded: bool = True, progress: bool = True) -> None:
        """Prime the kernels so that no later call stalls on compilation.

        On a GPU: run each prefill length the kernels are tuned for once - from an empty cache and continuing a
        cache (kernels are specialised on whether a state comes in) - and a decode step, so that no later prompt
        length stalls on kernel compilation or autotuning; with ``padded``, also a left-padded batch of two (padded
        prompts run fla's variable-length kernels). On a fresh machine this compiles and autotunes Triton kernels
        for minutes (Triton keeps the results on disk, so a second process takes seconds); ``progress`` shows a
        progress bar with the pass under way. On a CPU there is nothing to tune; with ``compile_cpu_decode`` a short
        prompt and a decode step compile the decode step for ``batch_size``.
        """
        if self.device.type == "cpu":
            if self.compile_cpu_decode:
                ids = torch.full((batch_size, 8), 3, dtype=torch.long, device=self.device)
                out = self(input_ids=ids, use_cache=True, logits_to_keep=1)  # warmup() runs under no_grad
                self(input_ids=ids[:, :1], past_key_values=output_cache(out), use_cache=True)
            return
        self._warmup_kernels(batch_size, padded, progress)

    def _warmup_kernels(self, batch_size: int, padded: bool, progress: bool) -> None:
        """The GPU passes of :meth:`warmup`."""
        from tqdm.auto import tqdm

        from .kda_fla import warmup_lengths

        lengths = warmup_lengths()
        passes = 3 * len(lengths) + (sum(length > 1 for length in lengths) if padded else 0)
        with tqdm(total=passes, desc="warmup (compiling kernels)", unit="pass", disable=not progress) as bar:
            for length in lengths:
                ids = torch.full((batch_size, length), 3, dtype=torch.long, device=self.device)
                bar.set_postfix_str(f"prompt of {length}")
                out = self(input_ids=ids, use_cache=True, logits_to_keep=1)
                bar.update()
                bar.set_postfix_str(f"prompt of {length} after a cache")
                out = self(input_ids=ids, past_key_values=output_cache(out), use_cache=True, logits_to_keep=1)
                bar.update()
                bar.set_postfix_str("decode step")
                self(input_ids=ids[:, :1], past_key_values=output_cache(out), use_cache=True)
                bar.update()
                if padded and length > 1:
                    bar.set_postfix_str(f"left-padded prompts of {length}")
                    mask = torch.ones(2, length, dtype=torch.long, device=self.device)
                    mask[1, 0] = 0
                    self(input_ids=ids[:1].expand(2, -1), attention_mask=mask, use_cache=True, logits_to_keep=1)
                    bar.update()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    # ------------------------------------------------------------------ generate(): lean decode steps
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      cache: KimiLinearCache | None = None,
                                      attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, is_first_iteration: bool | None = False,
                                      **kwargs: Any) -> dict[str, Any]:
        """``GenerationMixin.prepare_inputs_for_generation``, with a short path for a decode step (one new token,
        a cache, only the usual kwargs): the same inputs less ``position_ids``, which a one-token step never reads.
        It skips the general method's per-step work: ``inspect.signature(self.forward)`` (done every step for
        classes registered for an auto class, as ours are), ``self.device``, slicing the position ids and copying
        a batch-1 token (generate() concatenates a new ``input_ids`` each step, so the view stays valid)."""
        if (
            not is_first_iteration
            and next_sequence_length == 1
            and isinstance(cache, KimiLinearCache)
            and CACHE_FIELD == "cache"
            and kwargs.keys() <= _DECODE_STEP_KWARGS
            and input_ids.device == self.model.embed_tokens.weight.device
        ):
            last = input_ids[:, -1:]  # a view where it is contiguous (batch 1): one device copy less a step
            model_inputs = {"input_ids": last if last.is_contiguous() else last.contiguous(), "cache": cache}
            if attention_mask is not None:
                model_inputs["attention_mask"] = attention_mask
            for key, value in kwargs.items():
                if key != "position_ids":
                    model_inputs[key] = value
            return model_inputs
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )

    def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: dict[str, Any],
                                            is_encoder_decoder: bool = False, num_new_tokens: int = 1) -> dict[str, Any]:
        """``GenerationMixin._update_model_kwargs_for_generation``; for one new token with our cache it drops the
        ``position_ids`` instead of growing them (decode steps do not read them, see
        :meth:`prepare_inputs_for_generation`) and skips the checks for inputs we have no use for."""
        cache = outputs.get(CACHE_FIELD) if CACHE_FIELD == "cache" else None
        if (
            num_new_tokens == 1
            and not is_encoder_decoder
            and isinstance(cache, KimiLinearCache)
            and model_kwargs.get("token_type_ids") is None
            and model_kwargs.get("mm_token_type_ids") is None
        ):
            model_kwargs["cache"] = cache
            model_kwargs.pop("position_ids", None)
            if (mask := model_kwargs.get("attention_mask")) is not None:
                grown = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
                # the next static decode step need not copy a mask it already holds all but the ones column of;
                # the old mask is kept (generate() drops it) so that the step can tell it is the one it saw
                self.__dict__["_grown_mask"] = (weakref.ref(grown), mask)
                model_kwargs["attention_mask"] = grown
            return model_kwargs
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)

    def _static_decoder_for(self, input_ids, inputs_embeds, past_key_values, labels,  # noqa: ANN001
                            output_hidden_states, output_router_logits, use_cache, kwargs: dict) -> StaticDecoder | None:
        """The runner of a static decode step for this forward - CUDA graphs (``cuda_graph_decode``) or a compiled
        CPU step (``compile_cpu_decode``) - or ``None`` when this forward is not such a step."""
        one_step = (
            input_ids is not None
            and input_ids.shape[1] == 1
            and isinstance(past_key_values, KimiLinearCache)
            and past_key_values.get_seq_length() > 0
            and labels is None
            and use_cache is not False
            and not (output_hidden_states or output_router_logits)
            and inputs_embeds is None
            and kwargs.get("cu_seqlens") is None
            and not self.training
            and not torch.is_grad_enabled()
        )
        if not one_step:
            return None
        if input_ids.is_cuda and self.cuda_graph_decode:
            kind, runner = "_graph_decoder", StaticDecoder
        elif input_ids.device.type == "cpu" and self.compile_cpu_decode:
            kind, runner = "_compiled_decoder", CompiledDecoder
        else:
            return None
        if not weights_on_one_device(self, "CUDA graphs" if kind == "_graph_decoder" else "compiled CPU decode steps"):
            return None  # device_map over several devices or offloaded weights: op by op, one warning per model
        if kind == "_graph_decoder" and self._graph_capture_blocker() is not None:
            return None  # bitsandbytes 8-bit layers: op by op, one warning per model
        decoder = self.__dict__.get(kind)
        if decoder is None:
            decoder = self.__dict__[kind] = runner(self._decode_logits)
        return decoder

    def _graph_capture_blocker(self) -> str | None:
        """:func:`quantization.graph_capture_blocker` of this model, looked up again only after modules were
        registered (a global counter the decode guard keeps); the first reason found is warned about once."""
        key = decode_guard.registrations()
        cached = self.__dict__.get("_capture_blocker")
        if cached is None or cached[0] != key:
            reason = graph_capture_blocker(self)
            if reason is not None and (cached is None or cached[1] != reason):
                warnings.warn(f"{reason}: decoding runs op by op, without CUDA graphs", stacklevel=4)
            cached = self.__dict__["_capture_blocker"] = (key, reason)
        return cached[1]

    def _mask_source(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask that :meth:`_update_model_kwargs_for_generation` grew ``mask`` from by one column of ones, if
        it did (the update keeps that mask until the next one)."""
        grown = self.__dict__.get("_grown_mask")
        if mask is None or grown is None or grown[0]() is not mask:
            return None
        return grown[1]

    def _decode_logits(self, input_ids: torch.Tensor, cache: KimiLinearCache) -> torch.Tensor:
        """Logits ``[B, 1, V]`` of one decode step (the function a CUDA graph captures)."""
        hidden = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True).last_hidden_state
        return self._head(hidden)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(hidden)``; an int8 weight-only head (``TorchAoConfig(..., include_input_output_embeddings=
        True)``) of a CUDA decode step is read as int8 by the multi-linear launch (:func:`kernels.linears`), where
        the module call would first write the whole dequantized weight out in bf16. A bf16 head stays a cuBLAS
        call."""
        return linears(getattr(self.config, "decode_kernels", "auto"), [(hidden, self.lm_head)], kinds=("int8",))[0]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KimiLinearCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: KimiLinearCache | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        """Logits (and the shifted cross-entropy when ``labels`` are given, ignore index -100).

        ``logits_to_keep=k`` computes logits for the last ``k`` positions only (0 = all), so a long prefill never
        builds ``[T, vocab]`` logits. The cache may be passed as ``past_key_values`` or ``cache``.
        """
        past_key_values = one_cache(cache, past_key_values)
        decoder = self._static_decoder_for(input_ids, inputs_embeds, past_key_values, labels, output_hidden_states,
                                           output_router_logits, use_cache, kwargs)
        if decoder is not None:
            logits = decoder.step(input_ids, attention_mask, past_key_values,
                                  grown_from=self._mask_source(attention_mask))
            return build_output(MoeCausalLMOutputWithPast, logits=logits, **cache_field(past_key_values))
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self._head(hidden_states[:, keep, :])
        loss = aux_loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if outputs.router_logits:
            aux_loss = self.router_balance_loss(outputs.router_logits)
            if loss is not None and self.config.router_aux_loss_coef:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return build_output(
            MoeCausalLMOutputWithPast,
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **cache_field(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits,
        )


__all__ = ["KimiLinearPreTrainedModel", "KimiLinearModel", "KimiLinearForCausalLM"]

# save_pretrained writes an ``auto_map`` and copies this folder's modules next to the weights, so the checkpoint
# loads with ``trust_remote_code=True`` where this package is not installed.
KimiLinearModel.register_for_auto_class("AutoModel")
KimiLinearForCausalLM.register_for_auto_class("AutoModelForCausalLM")
