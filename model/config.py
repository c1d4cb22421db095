"""`RobertaConfig`: the fields of a Hugging Face `config.json` that the architecture uses.

A frozen dataclass: a config describes a checkpoint and never changes once read. Defaults are
transformers' `RobertaConfig` defaults (so a config.json without a field means the same to both;
note they are BERT's 512 positions, 2 token types and eps 1e-12, not roberta-base's values). Keys of
`config.json` that the architecture does not use (`architectures`, ...) are ignored (`dtype` and
`torch_dtype` are read by loading, for `from_pretrained(dtype="auto")`);
values it cannot run (an unknown `model_type`, `hidden_act` or `position_embedding_type`) raise
at load time, naming the file and the field, rather than producing wrong numbers later.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# model_type -> (state-dict prefix of the encoder body, position ids start at pad+1 like RoBERTa?)
# RoBERTa-family checkpoints share the architecture; BERT differs only in the prefix, positions
# counted from 0, and (for heads we do not support) its head layout.
MODEL_TYPES = {
    "roberta": ("roberta", True),
    "xlm-roberta": ("roberta", True),
    "camembert": ("roberta", True),
    "bert": ("bert", False),
}
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu", "swish", "tanh", "mish")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def position_offset(model_type: str, pad_token_id: int) -> int:
    """First position id of a sequence: pad+1 for the RoBERTa family (fairseq heritage: position
    ids start after the padding index), 0 for BERT and any model type this package does not know."""
    return pad_token_id + 1 if MODEL_TYPES.get(model_type, (None, False))[1] else 0


class ConfigError(ValueError):
    """A config.json the architecture cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class RobertaConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02  # std of the normal init of a model built from a config
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    position_embedding_type: str = "absolute"
    is_decoder: bool = False
    add_cross_attention: bool = False
    use_cache: bool = True
    # Defaults of the forward arguments of the same names, as in transformers.
    output_attentions: bool = False
    output_hidden_states: bool = False
    tie_word_embeddings: bool = True
    # num_labels is derived from id2label when that is given (as in transformers).
    num_labels: int | None = None
    id2label: dict[int, str] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)
    problem_type: str | None = None
    classifier_dropout: float | None = None
    model_type: str = "roberta"

    def __post_init__(self):
        # Frozen dataclass: fill derived fields once, here, through object.__setattr__. transformers
        # 5 writes null for a label2id (or num_labels) it was not given.
        id2label = {int(k): v for k, v in (self.id2label or {}).items()}
        num_labels = self.num_labels if self.num_labels is not None else (len(id2label) or 2)
        if not id2label or len(id2label) != num_labels:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        label2id = {str(k): int(v) for k, v in (self.label2id or {}).items()} or {v: k for k, v in id2label.items()}
        object.__setattr__(self, "num_labels", num_labels)
        object.__setattr__(self, "id2label", id2label)
        object.__setattr__(self, "label2id", label2id)
        self.validate()

    def validate(self, source: str = "config") -> None:
        def fail(name, why):
            raise ConfigError(f"{source}: field {name!r} = {getattr(self, name)!r}: {why}")

        if self.model_type not in MODEL_TYPES:
            fail("model_type", f"unsupported; this package runs {sorted(MODEL_TYPES)}")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"unknown activation; supported: {ACTIVATIONS}")
        if self.position_embedding_type != "absolute":
            fail("position_embedding_type", "only 'absolute' position embeddings are implemented")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"must be a multiple of num_attention_heads={self.num_attention_heads}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            fail("problem_type", f"must be one of {PROBLEM_TYPES} or null")
        if self.add_cross_attention and not self.is_decoder:
            fail("add_cross_attention", "cross-attention layers need is_decoder=true")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def body_prefix(self) -> str:
        return MODEL_TYPES[self.model_type][0]

    @property
    def position_offset(self) -> int:
        return position_offset(self.model_type, self.pad_token_id)

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table can hold (512 for roberta-base's 514 positions)."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "RobertaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known}
        try:
            config = cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        return config

    @classmethod
    def from_pretrained(cls, local_dir: str | Path) -> "RobertaConfig":
        path = Path(local_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a checkpoint directory needs config.json next to its weights "
                f"(Hugging Face layout: config.json, model.safetensors, tokenizer.json)"
            )
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return values

    def save_pretrained(self, local_dir: str | Path, architecture: str, dtype: str | None = None) -> None:
        """Write config.json that both this package and transformers read. dtype: the weights'
        (transformers' `dtype`, which from_pretrained(dtype="auto") loads them in)."""
        values = {"architectures": [architecture], **self.to_dict(), **({"dtype": dtype} if dtype else {})}
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text(json.dumps(values, indent=2) + "\n")
