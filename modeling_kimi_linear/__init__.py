"""kimi-linear: Moonshot AI's Kimi Linear (KDA + MLA hybrid MoE) for Hugging Face transformers.

This folder is also what a checkpoint carries as remote code, so every module in it imports only its siblings.
"""

import os
from typing import Any

from .cache_kimi_linear import KimiLinearCache
from .configuration_kimi_linear import KimiLinearConfig
from .modeling_kimi_linear import KimiLinearForCausalLM, KimiLinearModel, KimiLinearPreTrainedModel
from .tokenization_kimi import KimiTokenizer
from .tokenization_kimi_sp import KimiSentencePieceTokenizer, train_sentencepiece

__version__ = "0.1.0"

# tokenizer_config.json class names this package's tokenizer classes load (the release names ``TikTokenTokenizer``)
TOKENIZER_CLASSES = {
    "KimiTokenizer": KimiTokenizer,
    "TikTokenTokenizer": KimiTokenizer,
    "KimiSentencePieceTokenizer": KimiSentencePieceTokenizer,
}


def load_tokenizer(path: str | os.PathLike, **kwargs: Any):
    """The tokenizer saved in the directory ``path``. When its ``tokenizer_config.json`` names one of this package's
    tokenizers (:data:`TOKENIZER_CLASSES`), this package's class loads it, so no module needs to be copied beside the
    files (the embedded demo checkpoint carries none, and a released directory's own ``tokenization_kimi.py`` does
    not import on transformers 5); any other tokenizer loads through ``AutoTokenizer`` with ``trust_remote_code``.
    ``kwargs`` go to ``from_pretrained``."""
    import json
    from pathlib import Path

    config_path = Path(path) / "tokenizer_config.json"
    name = None
    if config_path.is_file():
        try:
            name = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ValueError(f"{config_path}: not a JSON object ({exc})") from None
    if name in TOKENIZER_CLASSES:
        return TOKENIZER_CLASSES[name].from_pretrained(path, **kwargs)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=True, **kwargs)


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
    "TOKENIZER_CLASSES",
    "load_tokenizer",
    "register",
    "train_sentencepiece",
]
