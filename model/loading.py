"""Checkpoint loading and saving: Hugging Face layout, safetensors only, strict.

One table (`CHECKPOINT_KEYS`) maps checkpoint keys to ours; `{}` is the layer number, `None`
drops a key. Keys are looked up after removing the body prefix (`roberta.` or `bert.`, or none:
sentence-transformers saves a bare `BertModel`).

Strictness: a checkpoint key that maps to nothing, a parameter the model needs that the checkpoint
lacks, and a tensor of the wrong shape all raise one `CheckpointError` listing every such key.
Dropped without error, and why:
- `embeddings.position_ids`, `embeddings.token_type_ids`: constant buffers old transformers saved;
  we compute both on the fly.
- weights of a part the loaded class does not have: a pooler, `lm_head.*`, `classifier.*` or
  BERT's `cls.*` head. Loading the base model from a masked-LM checkpoint is the normal way to embed.
- `lm_head.decoder.weight` when the config ties it to the word embeddings (the embedding is used).
- one of the LM bias's two copies, `lm_head.bias` and `lm_head.decoder.bias`. transformers 4 kept
  them one tensor; transformers 5 ties them only with tied word embeddings (`lm_head.bias` is then
  the one used), and an untied model's logits use `lm_head.decoder.bias`. We load the copy
  transformers 5 uses and save both, so either version reads our checkpoints.

The model is built on the `meta` device and the loaded tensors are assigned to it, so peak memory
stays near one copy of the weights. `pytorch_model.bin` is refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import RobertaConfig

# checkpoint module path (after the body prefix) -> ours; parameter suffixes (.weight/.bias) carry over.
CHECKPOINT_KEYS = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
    "embeddings.position_ids": None,
    "embeddings.token_type_ids": None,
    "encoder.layer.{}.attention.self.query": "layers.{}.attention.query",
    "encoder.layer.{}.attention.self.key": "layers.{}.attention.key",
    "encoder.layer.{}.attention.self.value": "layers.{}.attention.value",
    "encoder.layer.{}.attention.output.dense": "layers.{}.attention.out",
    "encoder.layer.{}.attention.output.LayerNorm": "layers.{}.attention.norm",
    "encoder.layer.{}.crossattention.self.query": "layers.{}.crossattention.query",
    "encoder.layer.{}.crossattention.self.key": "layers.{}.crossattention.key",
    "encoder.layer.{}.crossattention.self.value": "layers.{}.crossattention.value",
    "encoder.layer.{}.crossattention.output.dense": "layers.{}.crossattention.out",
    "encoder.layer.{}.crossattention.output.LayerNorm": "layers.{}.crossattention.norm",
    "encoder.layer.{}.intermediate.dense": "layers.{}.mlp_up",
    "encoder.layer.{}.output.dense": "layers.{}.mlp_down",
    "encoder.layer.{}.output.LayerNorm": "layers.{}.mlp_norm",
    "pooler.dense": "pooler",
    "lm_head.dense": "lm_head.dense",
    "lm_head.layer_norm": "lm_head.norm",
    "lm_head.decoder": "lm_head.decoder",
    "lm_head": "lm_head",  # lm_head.bias
    "classifier.dense": "classifier.dense",
    "classifier.out_proj": "classifier.out_proj",
}
# Old TensorFlow-era LayerNorm names.
LEGACY_SUFFIXES = {"gamma": "weight", "beta": "bias"}
# Keys of heads, which live outside the encoder body (a class lacking a head drops its keys: `_optional`).
HEAD_PREFIXES = ("lm_head.", "classifier.", "cls.")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_TEMPLATES = [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in CHECKPOINT_KEYS.items()]
_INVERSE = [(re.compile("^" + re.escape(v).replace(r"\{\}", r"(\d+)") + "$"), k) for k, v in CHECKPOINT_KEYS.items() if v]


NO_POOLER = "  (this checkpoint has no pooler: load RobertaModel with add_pooling_layer=False)"


class CheckpointError(ValueError):
    """A checkpoint directory this package cannot load; the message says what and what to do."""


def _lookup(table, module_path: str) -> tuple[bool, str | None]:
    for pattern, target in table:
        m = pattern.match(module_path)
        if m:
            return True, target.replace("{}", m.group(1)) if target and m.groups() else target
    return False, None


def our_key(checkpoint_key: str, body_prefix: str) -> tuple[bool, str | None]:
    """(known, our key relative to the model root of a head class, or None to drop).

    Body keys come back as `roberta.<ours>`; head keys as `lm_head.<...>`/`classifier.<...>`."""
    key = checkpoint_key.removeprefix(body_prefix + ".")
    module, _, suffix = key.rpartition(".")
    suffix = LEGACY_SUFFIXES.get(suffix, suffix)
    if key.startswith("cls.") or _lookup(_TEMPLATES, key) == (True, None):  # BERT's own heads; dropped buffers
        return True, None
    known, target = _lookup(_TEMPLATES, module)
    if not known or target is None:
        return known, None
    if module == "lm_head.decoder" and suffix == "bias":
        target, suffix = "lm_head", "bias"  # one of the LM bias's two copies (module docstring)
    full = f"{target}.{suffix}"
    return True, full if full.startswith(HEAD_PREFIXES) else "roberta." + full


def checkpoint_key(ours: str, body_prefix: str) -> str:
    """Inverse of `our_key` for saving: our head-class key -> Hugging Face key.
    body_prefix: "roberta." / "bert." for head classes, "" for a bare base model (as transformers saves it)."""
    body = ours.startswith("roberta.")
    module, _, suffix = (ours[len("roberta."):] if body else ours).rpartition(".")
    known, target = _lookup(_INVERSE, module)
    if not known:
        raise KeyError(ours)
    return f"{body_prefix}{target}.{suffix}" if body else f"{target}.{suffix}"


def weight_files(local_dir: Path) -> list[Path]:
    if not local_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {local_dir} does not exist")
    single, index = (local_dir / name for name in WEIGHT_FILES)
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (local_dir / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {local_dir}: {missing}")
        return [local_dir / s for s in shards]
    present = sorted(p.name for p in local_dir.iterdir())
    if any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in present):
        raise CheckpointError(
            f"{local_dir} holds only pickle weights ({[p for p in present if p.endswith(('.bin', '.pt', '.pth', '.ckpt'))]}). "
            "Loading pickle can run arbitrary code, so this package reads safetensors only. Convert once, "
            "in an environment you trust: `python -c \"import torch, safetensors.torch as st; "
            "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\"` "
            "(or transformers' `save_pretrained(dir, safe_serialization=True)`)."
        )
    raise CheckpointError(f"{local_dir} has no weights: expected one of {list(WEIGHT_FILES)}; found {present}")


# safetensors' names of the floating dtypes, for dtype="auto" from the weights
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """None: float32 (transformers 4's default). Else a floating torch.dtype or its name."""
    resolved = torch.float32 if dtype is None else getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: a model's weights need a floating dtype, e.g. {list(DTYPES)}, or 'auto' (the checkpoint's)")
    return resolved


def checkpoint_dtype(local_dir: Path, sources: dict[str, tuple[Path, str]]) -> torch.dtype:
    """dtype="auto": config.json's `dtype` (`torch_dtype` in transformers 4's files), else the
    weights' (the first loaded tensor's, from its file's header; `sources` as `match_checkpoint`
    returns them: integer buffers are dropped, so each is floating)."""
    path = local_dir / "config.json"  # absent when the caller passes config=
    config = json.loads(path.read_text()) if path.is_file() else {}
    if named := config.get("dtype") or config.get("torch_dtype"):
        return resolve_dtype(named)
    file, key = next(iter(sources.values()))
    with safe_open(str(file), framework="pt") as f:
        return SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), torch.float32)


def build_config(cls, local_dir: Path, config: RobertaConfig | None, kwargs: dict) -> tuple[RobertaConfig, dict]:
    """transformers' from_pretrained rules for the config: `config=` replaces config.json, and
    keyword arguments that name config fields override it (`num_labels=3`, `is_decoder=True`).
    Returns (config, the remaining keyword arguments, for the constructor)."""
    fields = {f.name for f in dataclasses.fields(RobertaConfig)}
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    config = config or RobertaConfig.from_pretrained(local_dir)
    # Labels as transformers sets them: id2label gives their number; a new number alone, new names.
    if "id2label" in overrides:
        overrides = {"num_labels": len(overrides["id2label"]), "label2id": {}, **overrides}
    elif overrides.get("num_labels", config.num_labels) != config.num_labels:
        overrides |= {"id2label": {}, "label2id": {}}
    config = dataclasses.replace(config, **overrides) if overrides else config
    takes = set(inspect.signature(cls.__init__).parameters) - {"self", "config"}
    if set(kwargs) - takes:
        raise TypeError(f"{cls.__name__}.from_pretrained: unknown arguments {sorted(set(kwargs) - takes)}; it takes "
                        f"dtype, device, config, fields of RobertaConfig (e.g. num_labels) and {sorted(takes) or 'nothing else'}")  # fmt: skip
    return config, kwargs


def match_checkpoint(cls, local_dir, config: RobertaConfig | None = None, **kwargs):
    """Build `cls(config, **kwargs)` on the meta device and match the checkpoint's keys to its
    parameters by name and shape, from the safetensors headers only (no tensor is read, so a job's
    driver checks a checkpoint this way in a fraction of a second). Raises one CheckpointError
    listing every problem. Returns (model on meta, {our key: (file, checkpoint key)}, tied).
    config and kwargs: as `build_config` takes them."""
    local_dir = Path(local_dir)
    files = weight_files(local_dir)
    config, kwargs = build_config(cls, local_dir, config, dict(kwargs))
    check_tokenizer_fits(local_dir, config)
    if cls.__name__ != "RobertaModel" and config.model_type == "bert":
        raise CheckpointError(
            f"{local_dir}: BERT checkpoints run through the base model only (RobertaModel, task embed); "
            f"{cls.__name__} needs a RoBERTa-family head."
        )

    with torch.device("meta"):
        model = cls(config, **kwargs)
    # Keys as this class names them in a head class (base-model keys gain the "roberta." prefix).
    is_base = not hasattr(model, "roberta")
    expected = {("roberta." + k if is_base else k): v for k, v in model.state_dict().items()}
    tied = getattr(model, "tie_weights", None) is not None and config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.decoder.weight")
    lm_bias = "lm_head.bias" if config.tie_word_embeddings else "lm_head.decoder.bias"  # the copy the logits use

    sources, unexpected, mismatched = {}, [], []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e}); "
                                  "copy the checkpoint again (a partial download or copy truncates it)") from None  # fmt: skip
        for key, shape in shapes.items():
            known, ours = our_key(key, config.body_prefix)
            if not known:
                unexpected.append(key)
            if ours is None or (ours not in expected and _optional(ours)):  # dropped by design
                continue
            if ours not in expected:
                unexpected.append(key)
            elif shape != tuple(expected[ours].shape):
                mismatched.append(f"{key}: checkpoint {shape}, model {tuple(expected[ours].shape)}")
            elif ours not in sources or (ours == "lm_head.bias" and key == lm_bias):  # the LM bias: the copy used
                sources[ours] = (file, key)
            elif ours != "lm_head.bias":
                mismatched.append(f"{key}: a second key of the same parameter ({ours}, also {sources[ours][1]})")
    # Named as the checkpoint would name them (as save_pretrained writes this class).
    missing = sorted(checkpoint_key(k, "" if is_base else config.body_prefix + ".") for k in set(expected) - set(sources))
    if unexpected or missing or mismatched:
        lines = [f"cannot load {local_dir} into {cls.__name__} (config: {config.model_type}, {config.num_hidden_layers} layers):"]
        lines += [f"  unexpected keys (not part of this architecture): {sorted(set(unexpected))}"] if unexpected else []
        lines += [f"  missing keys: {missing}"] if missing else []
        lines += [f"  mismatched tensors: {mismatched}"] if mismatched else []
        if missing and any(k.startswith(("pooler.", "roberta.pooler.")) for k in missing):
            lines.append(NO_POOLER)
        raise CheckpointError("\n".join(lines))
    return model, sources, tied


def load_pretrained(cls, local_dir, dtype=None, device=None, torch_dtype=None, **kwargs):
    """`match_checkpoint`, then assign the checkpoint's tensors to the model built on meta.

    dtype (torch_dtype: transformers 4's name for it): see `resolve_dtype`, or "auto" (`checkpoint_dtype`);
    device: where tensors land."""
    if dtype is not None and torch_dtype is not None:
        raise TypeError("pass dtype or torch_dtype (its older name), not both")
    local_dir = Path(local_dir)
    dtype, device = dtype or torch_dtype, torch.device(device or "cpu")
    dtype = dtype if dtype == "auto" else resolve_dtype(dtype)  # a wrong name fails before any file is read
    model, sources, tied = match_checkpoint(cls, local_dir, **kwargs)
    dtype = checkpoint_dtype(local_dir, sources) if dtype == "auto" else dtype
    loaded = {}
    for file in dict.fromkeys(file for file, _ in sources.values()):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            loaded |= {ours: f.get_tensor(key).to(dtype) for ours, (source, key) in sources.items() if source == file}
    if not hasattr(model, "roberta"):  # a base model: its keys without the head classes' prefix
        loaded = {k[len("roberta."):]: v for k, v in loaded.items()}
    model.load_state_dict(loaded, strict=not tied, assign=True)
    if tied:
        model.tie_weights()
    return model.eval()


def _optional(ours: str) -> bool:
    return ours.startswith(HEAD_PREFIXES) or ours.startswith("roberta.pooler")


def check_tokenizer_fits(local_dir: Path, config: RobertaConfig) -> None:
    """A tokenizer whose ids exceed the embedding table would index out of range mid-job: refuse now."""
    tokenizer_json = local_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        return
    from model.tokenizer import read_tokenizer_json

    size = read_tokenizer_json(tokenizer_json).get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise CheckpointError(
            f"{local_dir}: tokenizer.json has {size} tokens but config.json vocab_size is {config.vocab_size}; "
            "token ids past the embedding table would fail. Use the tokenizer the model was trained with."
        )


def save_pretrained(model, local_dir) -> None:
    """config.json + model.safetensors under the Hugging Face key names (tied decoder omitted; an
    untied LM bias under both its names, as transformers 5 reads it from `lm_head.decoder.bias`)."""
    local_dir = Path(local_dir)
    is_base = not hasattr(model, "roberta")
    prefix = "" if is_base else model.config.body_prefix + "."
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.decoder.weight" and model.config.tie_word_embeddings:
            continue
        name = checkpoint_key("roberta." + key if is_base else key, prefix)
        tensors[name] = tensor.detach().contiguous().cpu()
        if key == "lm_head.bias" and not model.config.tie_word_embeddings:
            tensors["lm_head.decoder.bias"] = tensors[name].clone()  # safetensors refuses shared storage
    architecture = type(model).__name__  # as transformers names the class, e.g. BertModel for a BERT config
    model.config.save_pretrained(local_dir, architecture.replace("Roberta", "Bert") if model.config.model_type == "bert" else architecture,
                                 dtype=str(model.dtype).removeprefix("torch."))  # fmt: skip
    save_file(tensors, str(local_dir / "model.safetensors"), metadata={"format": "pt"})
