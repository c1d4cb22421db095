"""Pure-PyTorch RoBERTa family with the transformers API. Imports torch, safetensors and tokenizers only."""

from model.config import ConfigError, RobertaConfig
from model.loading import CheckpointError
from model.roberta import (
    RobertaForCausalLM,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
    sentence_embedding,
)
from model.tokenizer import RobertaTokenizer

__all__ = [
    "CheckpointError",
    "ConfigError",
    "RobertaConfig",
    "RobertaForCausalLM",
    "RobertaForMaskedLM",
    "RobertaForSequenceClassification",
    "RobertaModel",
    "RobertaTokenizer",
    "sentence_embedding",
]
