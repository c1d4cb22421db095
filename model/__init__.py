"""Pure-PyTorch RoBERTa family with the transformers API. Imports torch, safetensors and tokenizers only.

The config and the tokenizer import no torch; the model classes (and CheckpointError) import it on
first use, so that a process that only tokenizes (the pipeline's tokenizer actors) never loads it.
"""

import importlib

from model.config import ConfigError, RobertaConfig
from model.tokenizer import RobertaTokenizer

_TORCH_BACKED = {  # name -> the module defining it, imported on first access (PEP 562)
    "CheckpointError": "model.loading",
    "RobertaForCausalLM": "model.roberta",
    "RobertaForMaskedLM": "model.roberta",
    "RobertaForSequenceClassification": "model.roberta",
    "RobertaModel": "model.roberta",
    "sentence_embedding": "model.roberta",
}

__all__ = ["ConfigError", "RobertaConfig", "RobertaTokenizer", *_TORCH_BACKED]


def __getattr__(name: str):
    if name in _TORCH_BACKED:
        return getattr(importlib.import_module(_TORCH_BACKED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_TORCH_BACKED])
