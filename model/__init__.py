"""Pure-PyTorch RoBERTa family with the transformers API. Imports torch, safetensors and tokenizers only.

Each name loads its module on first use (lazy_loader, PEP 562). The config and the tokenizer need
no torch, so a process that only tokenizes (the pipeline's tokenizer actors) never loads it.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "config": ["ConfigError", "RobertaConfig"],
        "cpu_fusion": ["fuse_linear_layers"],
        "loading": ["CheckpointError"],
        "roberta": ["RobertaForCausalLM", "RobertaForMaskedLM", "RobertaForSequenceClassification", "RobertaModel",
                    "sentence_embedding"],  # fmt: skip
        "tokenizer": ["RobertaTokenizer"],
    },
)
