"""kimi-linear: Moonshot AI's Kimi Linear (KDA + MLA hybrid MoE) for Hugging Face transformers.

This folder is also what a checkpoint carries as remote code, so every module in it imports only its siblings.
"""

from .cache_kimi_linear import KimiLinearCache
from .configuration_kimi_linear import KimiLinearConfig
from .modeling_kimi_linear import KimiLinearForCausalLM, KimiLinearModel, KimiLinearPreTrainedModel
from .tokenization_kimi import KimiTokenizer
from .tokenization_kimi_sp import KimiSentencePieceTokenizer, train_sentencepiece

__version__ = "0.1.0"


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` resolve ``model_type="kimi_linear"`` to this
    package instead of native transformers (process-wide, opt-in)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("kimi_linear", KimiLinearConfig, exist_ok=True)
    AutoModel.register(KimiLinearConfig, KimiLinearModel, exist_ok=True)
    AutoModelForCausalLM.register(KimiLinearConfig, KimiLinearForCausalLM, exist_ok=True)


__all__ = [
    "KimiLinearCache",
    "KimiLinearConfig",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "KimiLinearPreTrainedModel",
    "KimiSentencePieceTokenizer",
    "KimiTokenizer",
    "register",
    "train_sentencepiece",
]
