"""The benchmark's tasks, one small class each: the checkpoint it runs, the transformers baseline's
head, how rayberta's output columns compare with the baseline's, and where its head runs and
whether rayberta's last layer runs only there (`last_layer_at_head`; both for the FLOPs count).
`jobs/benchmark.py` runs every task the same way.

Checkpoints: RoBERTa with random weights saved with our own code and a byte-level BPE trained on
the corpus (`small` = 6 layers x 384, `base` = roberta-base's shape), except `embed`, which always
runs all-MiniLM-L6-v2's real weights (BERT architecture, through our base model).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from jobs.demo import CentroidProbe, corpus_csv, minilm_dir
from model import RobertaConfig, RobertaForCausalLM, RobertaForMaskedLM, RobertaForSequenceClassification
from pipeline import TaskOptions

# roberta-base's config.json values where they differ from RobertaConfig's (transformers') defaults.
ROBERTA_FIELDS = dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
SIZES = {
    "small": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
CORPUS_ROWS = 33530


def corpus(rows: int, seed: int = 0, column: str = "text") -> list:
    """`rows` movie reviews, shuffled, their `column` (text; or label: 1 positive, 0 negative); past
    the corpus's 33,530 the same shuffled order repeats, and fewer rows are the first of more."""
    import pyarrow.csv as pacsv

    values = pacsv.read_csv(corpus_csv())[column].to_pylist()
    return [values[i] for i in np.resize(np.random.default_rng(seed).permutation(len(values)), rows)]


def train_bpe(path: Path, vocab_size: int = 30000) -> Path:
    """A byte-level BPE with RoBERTa's specials, trained on the whole corpus once per workdir
    (it takes a while) and shared by every head's checkpoint."""
    if path.is_file():
        return path
    from tokenizers import AddedToken, ByteLevelBPETokenizer, processors

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(CORPUS_ROWS), vocab_size=vocab_size, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # fmt: skip
    bpe.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    bpe.save(str(path))
    return path


def make_checkpoint(directory: Path, size: str, head: type, **config) -> Path:
    """A random-weight RoBERTa of class `head` saved with our own code, with the corpus BPE."""
    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(shutil.copy(train_bpe(directory.parent / "bpe" / "tokenizer.json"), directory))
    torch.manual_seed(0)
    head(RobertaConfig(vocab_size=tokenizer.get_vocab_size(), **ROBERTA_FIELDS, **SIZES[size], **config)).save_pretrained(directory)
    return directory


def stack(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list column -> (N, D) numpy."""
    return np.stack(column.to_numpy(zero_copy_only=False))


class Bench:
    """One benchmark task. The baseline loop calls `head` on each tokenized batch; `read` puts
    rayberta's output table in the same (N, k) layout, so that `quality` can compare the two."""

    name: str  # --task
    task: str  # the rayberta task (CLI subcommand) it runs
    auto_class: str  # transformers class of the baselines
    options = TaskOptions()
    cli_flags: tuple[str, ...] = ()  # the CLI flags that give `options`
    batch = 32  # texts per baseline batch
    sorted_baseline = True
    rows, max_length = 1500, None  # defaults of --rows and --max-length (None: the model's positions)
    last_layer_at_head = False  # rayberta runs the last layer only where the head reads (one position per pass)

    def checkpoint(self, workdir: Path, size: str) -> Path:
        raise NotImplementedError

    def head(self, model, enc, tokenizer) -> torch.Tensor:
        """The baseline's per-row outputs (B, k) for one padded batch."""
        raise NotImplementedError

    def read(self, table: pa.Table) -> np.ndarray:
        raise NotImplementedError

    def quality(self, out: np.ndarray, reference: np.ndarray) -> dict:
        raise NotImplementedError

    def head_flops(self, config: RobertaConfig) -> float:
        """FLOPs of the head at one position it runs on."""
        return 0.0

    def head_positions(self, lengths: np.ndarray) -> np.ndarray:
        """Positions per row where the head runs."""
        return np.zeros_like(lengths)

    def copies(self, lengths: np.ndarray) -> np.ndarray:
        """Encoder passes per row."""
        return np.ones_like(lengths)


class Classify(Bench):
    name, task, auto_class = "classify", "classify", "AutoModelForSequenceClassification"
    last_layer_at_head = True

    def checkpoint(self, workdir, size):
        return make_checkpoint(workdir / f"roberta-{size}-classify", size, RobertaForSequenceClassification,
                               id2label={0: "negative", 1: "positive"})  # fmt: skip

    def head(self, model, enc, tokenizer):
        return model(**enc).logits.softmax(-1)  # (B, labels)

    def read(self, table):
        return stack(table["probs"])

    def quality(self, out, reference):
        """Also the reference's margins (top probability minus the runner-up's): a random classifier
        gives near-ties, whose labels any rounding flips. disagreeing_max_margin is the largest
        margin among rows whose labels differ (0 if none)."""
        top2 = np.sort(reference, 1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        disagree = out.argmax(1) != reference.argmax(1)
        return {"label_agreement": float(1 - disagree.mean()), "within_bound": bool(1 - disagree.mean() >= 0.995),
                "max_prob_diff": float(np.abs(out - reference).max()),
                "median_margin": float(np.median(margin)), "disagreeing_max_margin": float(margin[disagree].max(initial=0.0))}  # fmt: skip

    def head_flops(self, config):
        return 2.0 * (config.hidden_size**2 + config.hidden_size * config.num_labels)  # dense + out_proj

    def head_positions(self, lengths):
        return np.ones_like(lengths)  # on <s> only


class Embed(Bench):
    """Mean pooling over the attention mask, then L2 normalisation: sentence-transformers' recipe
    for all-MiniLM-L6-v2."""

    name, task, auto_class = "embed", "embed", "AutoModel"
    options, cli_flags = TaskOptions(pooling="mean", normalize=True), ("--pooling", "mean", "--normalize")

    def checkpoint(self, workdir, size):
        return minilm_dir()  # real weights whatever --size says

    def head(self, model, enc, tokenizer):
        h = model(**enc).last_hidden_state  # (B, T, H)
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    def read(self, table):
        return stack(table["embedding"])

    def quality(self, out, reference):
        """Cosines, and what they mean for a classifier trained on real embeddings (the random
        classify checkpoints give near-ties; no package ships a trained RoBERTa classifier): the
        demo's sentiment probe, fit on the reference embeddings and the reviews' true labels,
        labels both; probe_label_agreement is how often it gives the same label."""
        cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
        probe = CentroidProbe(reference, np.array(corpus(len(reference), column="label")))
        return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "within_bound": bool(cos.min() >= 0.999),
                "probe_label_agreement": float((probe(out) == probe(reference)).mean())}  # fmt: skip


class Score(Bench):
    """Outputs (N, 2): summed log-likelihood, scored tokens; perplexity = exp(-sum LL / sum tokens).

    Random weights (transformers' init, normal(0, 0.02)) give near-uniform predictions: perplexities
    near the vocabulary size (about 33,000, nll_per_token about 10.4). Before 2026-11-27 the
    checkpoints had torch's default init (embeddings N(0, 1), tied decoder) and perplexities near
    1e35; the older tables in jobs/BENCHMARKS.md come from those."""

    task = "score"

    def read(self, table):
        return np.stack([table["log_likelihood"].to_numpy(), table["num_tokens"].to_numpy()], 1).astype(np.float64)

    def quality(self, out, reference):
        ppl, ref = perplexity(out), perplexity(reference)
        scored = reference[:, 1] > 0
        rows = perplexity(out[scored], per_row=True) / perplexity(reference[scored], per_row=True) - 1
        return {"perplexity": ppl, "nll_per_token": float(np.log(ppl)), "perplexity_rel_diff": ppl / ref - 1,
                "max_row_perplexity_rel_diff": float(np.abs(rows).max()), "same_scored_tokens": bool((out[:, 1] == reference[:, 1]).all()),
                "within_bound": bool(abs(ppl / ref - 1) <= 0.01)}  # fmt: skip

    def head_flops(self, config):
        return 2.0 * (config.hidden_size**2 + config.hidden_size * config.vocab_size)  # LM head: dense + decoder


class ScoreCausal(Score):
    """Baseline: logits for every position, log_softmax over the full vocabulary, the next token's
    log-probability gathered and masked by the attention mask."""

    name, auto_class = "score-causal", "AutoModelForCausalLM"

    def checkpoint(self, workdir, size):
        return make_checkpoint(workdir / f"roberta-{size}-causal-lm", size, RobertaForCausalLM, is_decoder=True)

    def head(self, model, enc, tokenizer):
        ids, mask = enc["input_ids"], enc["attention_mask"]
        lp = torch.log_softmax(model(**enc).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        return torch.stack([(lp * mask[:, 1:]).sum(1), mask[:, 1:].sum(1)], 1).double()

    def head_positions(self, lengths):
        return np.maximum(lengths - 1, 0)  # every token after <s>


class ScorePseudo(Score):
    """Baseline, the straightforward pseudo-log-likelihood: per text (batch of 1 text, so no padding),
    one copy per token between <s> and </s> with that token replaced by <mask>; the copies of the
    text go through RobertaForMaskedLM 32 at a time, full LM head and log_softmax over the full
    vocabulary at every position, and the masked position's log-probability of its token is kept.
    ~T forwards per text of T tokens: hence the small defaults. Sorting cannot help a batch of one
    text, so there is no sorted baseline."""

    name, auto_class = "score-pseudo", "AutoModelForMaskedLM"
    batch, sorted_baseline, last_layer_at_head = 1, False, True
    rows, max_length = 60, 64
    COPIES = 32  # copies per forward

    def checkpoint(self, workdir, size):
        return make_checkpoint(workdir / f"roberta-{size}-masked-lm", size, RobertaForMaskedLM)

    def head(self, model, enc, tokenizer):
        out = []
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
            ids = ids[mask.bool()]
            at = torch.arange(1, len(ids) - 1)  # every token between <s> and </s>
            copies = ids.repeat(len(at), 1)
            copies[torch.arange(len(at)), at] = tokenizer.mask_token_id
            ll = 0.0
            for i in range(0, len(at), self.COPIES):
                lp = torch.log_softmax(model(input_ids=copies[i : i + self.COPIES]).logits, -1)  # (C, T, V)
                pos = at[i : i + self.COPIES]
                ll += float(lp[torch.arange(len(pos)), pos, ids[pos]].sum())
            out.append([ll, len(at)])
        return torch.tensor(out, dtype=torch.float64)

    def head_positions(self, lengths):
        return np.maximum(lengths - 2, 0)  # one masked position per copy

    def copies(self, lengths):
        return np.maximum(lengths - 2, 0)


def perplexity(out: np.ndarray, per_row: bool = False):
    """exp(-LL / tokens) of (N, 2) score outputs, over the whole set or per row."""
    if per_row:
        return np.exp(-out[:, 0] / out[:, 1])
    return float(np.exp(-out[:, 0].sum() / out[:, 1].sum()))


BENCHES: dict[str, Bench] = {b.name: b for b in (Classify(), Embed(), ScoreCausal(), ScorePseudo())}
