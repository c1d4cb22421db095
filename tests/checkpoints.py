"""Tiny random reference checkpoints built with transformers (test-only), saved in the Hugging Face layout.

Random init is too gentle to expose mistakes (LayerNorm hides uniform shifts, small weights make
every head look alike), so `widen` spreads the weights before saving."""

from pathlib import Path

import torch
import transformers

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)


@torch.no_grad()
def widen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "LayerNorm" in name or "layer_norm" in name:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
        else:
            p.copy_(0.15 * noise)
    return model


def reference(kind: str = "RobertaModel", seed: int = 0, **overrides):
    """A widened transformers model (eager attention, eval mode) of the tiny config."""
    config = transformers.RobertaConfig(**{**TINY, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    return widen(getattr(transformers, kind)(config), seed).eval()


def save(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def padded_batch(lengths, vocab_size=99, pad_id=1, seed=0, type_vocab_size=1):
    """Right-padded (B, T) ids of the given lengths starting with <s>=0 and ending with </s>=2."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, vocab_size, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 0, 2
        mask[i, :n] = 1
    types = torch.randint(0, type_vocab_size, ids.shape, generator=g) * mask
    return ids, mask, types
