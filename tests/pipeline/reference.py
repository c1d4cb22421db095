"""What each task's output should be, computed one text at a time with transformers (test-only).

No batching, no padding, no packing: the plainest possible use of the reference, so any batching
or ordering mistake in the pipeline shows up as a difference."""

import numpy as np
import torch
import transformers

MAX_TOKENS = 128  # the tiny checkpoints have 130 positions: 128 usable


def _encode(tokenizer, text, pair=None):
    # Batch form even for one row: for a single string transformers drops an empty pair ("" is falsy),
    # for a batch it keeps it; the pipeline encodes batches, so a pair column value "" stays a pair.
    return tokenizer([text or ""], None if pair is None else [pair], truncation=True, max_length=MAX_TOKENS, return_tensors="pt")


@torch.no_grad()
def classify(model_dir, texts, pairs=None):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    pairs = pairs or [None] * len(texts)
    return np.stack([model(**_encode(tokenizer, t, p)).logits[0].numpy() for t, p in zip(texts, pairs)])  # (N, num_labels)


@torch.no_grad()
def embed(model_dir, texts, pooling="mean", normalize=False):
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    pool = {"mean": lambda out: out.last_hidden_state[0].mean(0), "cls": lambda out: out.last_hidden_state[0, 0],
            "pooler": lambda out: out.pooler_output[0]}[pooling]  # fmt: skip
    embeddings = np.stack([pool(model(**_encode(tokenizer, t))).numpy() for t in texts])
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True) if normalize else embeddings


@torch.no_grad()
def fill_mask(model_dir, texts, top_k):
    """Per text: per <mask>, (top-k ids, their probabilities)."""
    model = transformers.AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for t in texts:
        enc = _encode(tokenizer, t)
        probs = model(**enc).logits[0].softmax(-1)[enc["input_ids"][0] == tokenizer.mask_token_id]
        p, i = probs.topk(top_k, -1)
        out.append([(ids.tolist(), ps.numpy()) for ids, ps in zip(i, p)])
    return out


@torch.no_grad()
def causal_log_likelihood(model_dir, texts):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for t in texts:
        ids = _encode(tokenizer, t)["input_ids"]
        lp = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])
        out.append((lp.sum().item(), ids.shape[1] - 1))
    return out


@torch.no_grad()
def pseudo_log_likelihood(model_dir, texts):
    """Salazar et al. 2020 done the straightforward way: one full forward per masked copy."""
    model = transformers.AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for t in texts:
        ids = _encode(tokenizer, t)["input_ids"][0]
        total = 0.0
        for i in range(1, len(ids) - 1):
            masked = ids.clone()
            masked[i] = tokenizer.mask_token_id
            total += model(masked[None]).logits[0, i].log_softmax(-1)[ids[i]].item()
        out.append((total, len(ids) - 2))
    return out


@torch.no_grad()
def causal_log_likelihood_strided(model_dir, texts, stride):
    """transformers' perplexity recipe (docs: "Perplexity of fixed-length models"): windows of the
    model's length advance `stride` tokens; each window scores only the tokens no window scored yet."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for t in texts:
        ids = tokenizer(t)["input_ids"]
        total, count, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), stride):
            end = min(begin + MAX_TOKENS, len(ids))
            window = torch.tensor(ids[begin:end])[None]
            lp = model(window).logits[0, :-1].log_softmax(-1).gather(-1, window[0, 1:, None])[:, 0]
            new = end - max(prev_end, 1)  # tokens not scored yet (never <s>)
            total += lp[-new:].sum().item() if new > 0 else 0.0
            count += max(new, 0)
            prev_end = end
            if end == len(ids):
                break
        out.append((total, count))
    return out
