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


def train_bpe(texts, directory: Path, vocab_size: int = 400, vocab_files: bool = False) -> Path:
    """A real byte-level BPE (RoBERTa's specials at ids 0-4) in `directory`: tokenizer.json as the
    reference saves it, or (`vocab_files`) the vocab.json + merges.txt it was trained into."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(directory))
    if not vocab_files:
        tokenizer = reference_tokenizer(directory)
        for name in ("vocab.json", "merges.txt"):
            (directory / name).unlink()
        tokenizer.save_pretrained(str(directory))
    return directory


def reference_tokenizer(directory: Path) -> transformers.RobertaTokenizerFast:
    """transformers' tokenizer of a `train_bpe` folder. From vocab files, transformers 5 gives <mask>
    lstrip=False; roberta-base's tokenizer.json (and transformers 4) have lstrip=True, which is what
    we implement: passed explicitly."""
    from tokenizers import AddedToken

    mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
    return transformers.RobertaTokenizerFast.from_pretrained(str(directory), mask_token=mask)


def checkpoint(directory: Path, tokenizer_dir: Path, kind: str, **overrides) -> Path:
    """A widened tiny `kind` saved by transformers next to a copy of the tokenizer in `tokenizer_dir`."""
    import shutil

    vocab = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = reference(kind, **{"vocab_size": len(vocab), "max_position_embeddings": 130, **overrides})
    model.save_pretrained(directory)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    return directory
