"""Tasks: what the user asks for (`classify`, `embed`, `fill-mask`, `score`), each one small class.

A task knows which model class (head) it needs, runs one micro-batch of right-padded token ids
through it (with the rows' lengths, so that on a GPU the model skips the pads) and returns per-row
outputs, then turns the outputs of a whole block into the Arrow columns it documents. It never
sees Ray: `pipeline.stages.Infer` feeds it.

Adding a task is one class here plus one entry in `TASKS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from model import RobertaConfig, RobertaForCausalLM, RobertaForMaskedLM, RobertaForSequenceClassification, RobertaModel, RobertaTokenizer
from model.loading import NO_POOLER, CheckpointError, match_checkpoint
from model.roberta import POOLINGS, problem_type, sentence_embedding, to_device


# Bytes of (chunk, V) float32 logits at once in score's LM head (their log-softmax takes as much
# again): never a (tokens, V) tensor for a whole micro-batch. Each chunk multiplies by the whole
# (V, H) decoder weight (46 MB in fp32 for the benchmark's 30k vocabulary), so fewer, larger chunks
# read it fewer times, the likely reason bigger is faster. Measured on the CPU inference actor's
# allocator (jemalloc), score-causal small fp32 model stage, 300 rows, sizes interleaved in one
# process (tokens/s): 8 MiB 2,474 / 2,463 / 2,115; 32 MiB (the size chosen earlier, on glibc)
# 2,890 / 3,088 / 2,833 and 2,851 / 2,797 / 2,974; 128 MiB 3,322 / 3,294 / 3,128 and 3,085 /
# 3,190 / 3,255; 256 MiB 3,130 / 3,086 / 3,163. Pseudo-LL bf16 (60 rows of 64 tokens) ran at
# 256-263 tokens/s at 8, 32 and 128 MiB alike. On a GPU (667 positions a chunk for a 50k
# vocabulary) not measured.
LM_HEAD_CHUNK_BYTES = 128 * 2**20


class TaskError(ValueError):
    """The task cannot run on this checkpoint; the message names both and what would work."""


@dataclass(frozen=True)
class TaskOptions:
    """Task-specific options (CLI flags of the same names). A task ignores the others' options,
    except `stride`, which only score takes (another task refuses it rather than truncate silently)."""

    threshold: float = 0.5  # classify, multi-label: labels whose probability >= threshold
    logits: bool = False  # classify: also write raw logits
    pooling: str = "mean"  # embed: mean | cls | pooler
    normalize: bool = False  # embed: L2-normalise
    embedding_dtype: str = "float32"  # embed: float32 | float16
    top_k: int = 5  # fill-mask: predictions per <mask>
    stride: int | None = None  # score: slide windows by this many tokens over long documents instead of truncating


def encode(model: RobertaModel, ids, mask, lengths):
    """The base model's output for inference: never attention maps or every layer's states, whatever
    the checkpoint's config sets as their default (maps do not combine with `lengths`)."""
    return model(ids, mask, lengths=lengths, output_attentions=False, output_hidden_states=False)


def checkpoint_heads(model_dir: str | Path) -> set[str]:
    """Which heads of a checkpoint this package runs, from config.json's `architectures`
    (transformers writes it). BERT checkpoints run through the base model only (their heads'
    layout differs; model/loading.py refuses them)."""
    RobertaConfig.from_pretrained(model_dir)  # a missing or invalid config.json: its clear error
    config = json.loads((Path(model_dir) / "config.json").read_text())
    names = " ".join(config.get("architectures") or [])
    heads = {"base"}
    if config.get("model_type") == "bert":
        return heads
    if "ForSequenceClassification" in names:
        heads.add("classifier")
    if "ForMaskedLM" in names:
        heads.add("masked_lm")
    if "ForCausalLM" in names or config.get("is_decoder"):
        heads.add("causal_lm")
    return heads


class Task:
    name: str
    needs: tuple[str, ...]  # any one of these heads will do
    outputs: tuple[str, ...]  # the columns `columns` writes
    # Whether `run` cuts one row's work by the budget (score's windows and masked copies): only then
    # can a smaller budget make a single row fit after a CUDA out-of-memory.
    splits_rows: bool = False

    def __init__(self, model_dir: str, options: TaskOptions):
        self.model_dir, self.options = model_dir, options

    def check(self) -> RobertaConfig:
        """Before any data moves (on the driver, and again where the model loads): the checkpoint
        has a head this task runs and the options fit it. Returns the checkpoint's config."""
        heads = checkpoint_heads(self.model_dir)
        if not heads & set(self.needs):
            usable = sorted(t.name for t in TASKS.values() if heads & set(t.needs))
            raise TaskError(
                f"task {self.name!r} needs a checkpoint with a {' or '.join(self.needs)} head; "
                f"{self.model_dir} has {sorted(heads - {'base'}) or 'only the base model'}. "
                f"Tasks this checkpoint supports: {usable}."
            )
        config = RobertaConfig.from_pretrained(self.model_dir)
        self.check_options(config)
        return config

    def check_weights(self) -> None:
        """On the driver: the checkpoint's weights fit the class `load` builds (names and shapes from
        the file headers, and the tokenizer's size). Where the model loads, loading checks the same."""
        cls, kwargs = self.model_class()
        match_checkpoint(cls, self.model_dir, **kwargs)

    def check_options(self, config: RobertaConfig) -> None:
        if self.options.stride is not None:
            raise TaskError(f"--stride is an option of the score task, not of {self.name!r}; leave it out")

    def model_class(self) -> tuple[type, dict]:
        """The model class this task runs and its constructor arguments."""
        raise NotImplementedError

    def load(self, dtype, device) -> torch.nn.Module:
        cls, kwargs = self.model_class()
        return cls.from_pretrained(self.model_dir, dtype=dtype, device=device, **kwargs)

    def cost(self, length: int) -> int:
        """Tokens one row of `length` tokens puts through the encoder (the token budget counts these)."""
        return length

    def run(self, model, ids: torch.Tensor, mask: torch.Tensor, lengths: np.ndarray, budget: int) -> dict[str, torch.Tensor | np.ndarray]:
        """ids, mask (B, T) right-padded on the model's device, lengths (B,) their real tokens on the
        host (for the model's `lengths`: on a GPU its layers skip the pads) -> per-row outputs, first dim B:
        tensors left on the device where the task can (Infer copies them to the host once per call,
        so that a GPU never waits between micro-batches for the host to read a result), else numpy."""
        raise NotImplementedError

    def columns(self, outputs: dict[str, np.ndarray]) -> dict[str, pa.Array]:
        raise NotImplementedError

    def output_columns(self) -> tuple[str, ...]:
        """The columns `columns` writes for this checkpoint and these options (kept input columns
        must not have these names)."""
        return self.outputs

    def non_finite(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """(B,) bool: rows with NaN or inf in any float output (an argmax over NaN would still give
        a label, so Infer fails these rows instead)."""
        rows = len(next(iter(outputs.values())))
        bad = np.zeros(rows, bool)
        for array in outputs.values():
            if np.issubdtype(array.dtype, np.floating):
                bad |= ~np.isfinite(array.reshape(rows, -1)).all(1)
        return bad


class Classify(Task):
    """Columns: label, label_id, score, probs (single-label); labels, probs (multi-label, by
    threshold); score (regression: float32 for one output, a fixed-size list for several); logits
    on request. The kind is config.json's problem_type, else regression for one output and
    single-label for several (`model.roberta.problem_type`, the loss's rule)."""

    name, needs = "classify", ("classifier",)
    OUTPUTS = {"single_label_classification": ("label", "label_id", "score", "probs"),
               "multi_label_classification": ("labels", "probs"), "regression": ("score",)}  # fmt: skip

    def check_options(self, config):
        super().check_options(config)
        if config.num_labels == 1 and config.problem_type == "single_label_classification":
            raise TaskError(f"{self.model_dir}/config.json: problem_type single_label_classification with one output "
                            "gives every row probability 1; set problem_type to regression (a score) or "
                            "multi_label_classification (a sigmoid probability)")  # fmt: skip

    def model_class(self):
        return RobertaForSequenceClassification, {}

    @cached_property
    def kind(self) -> str:
        """The loss's rule, without labels to look at: an explicit problem_type wins, else one output
        is regression and several are single-label. Read once (the driver asks for every shard)."""
        return problem_type(RobertaConfig.from_pretrained(self.model_dir), labels=None)

    def output_columns(self):
        return self.OUTPUTS[self.kind] + (("logits",) if self.options.logits else ())

    def load(self, dtype, device):
        model = super().load(dtype, device)
        self.id2label = model.config.id2label
        return model

    def run(self, model, ids, mask, lengths, budget):
        first = torch.zeros(len(ids), 1, dtype=torch.long, device=ids.device)  # the head reads <s> only
        return {"logits": model.classifier(model.roberta.hidden_at(ids, mask, first, lengths)).float()}  # (B, num_labels)

    def columns(self, outputs):
        logits = outputs["logits"]
        cols = {}
        if self.kind == "regression":  # one output: a number; several: a vector
            cols["score"] = pa.array(logits[:, 0], pa.float32()) if logits.shape[1] == 1 else fixed_list(logits)
        else:
            t = torch.from_numpy(logits)
            multi_label = self.kind == "multi_label_classification"
            probs = (torch.sigmoid(t) if multi_label else torch.softmax(t, -1)).numpy()
            if multi_label:
                cols["labels"] = pa.array([[self.id2label[j] for j in np.flatnonzero(p >= self.options.threshold)] for p in probs], pa.list_(pa.string()))
            else:
                label_id = probs.argmax(-1)
                cols["label"] = pa.array([self.id2label[int(i)] for i in label_id], pa.string())
                cols["label_id"] = pa.array(label_id, pa.int32())
                cols["score"] = pa.array(probs[np.arange(len(probs)), label_id], pa.float32())
            cols["probs"] = fixed_list(probs)
        if self.options.logits:
            cols["logits"] = fixed_list(logits)
        return cols


class Embed(Task):
    """Column embedding: fixed-size list of float32 (or float16), pooled mean/cls/pooler."""

    name, needs, outputs = "embed", ("base",), ("embedding",)
    EMBEDDING_DTYPES = ("float32", "float16")

    def check_options(self, config):
        super().check_options(config)
        if self.options.pooling not in POOLINGS:
            raise TaskError(f"--pooling {self.options.pooling!r}: choose one of {POOLINGS}")
        if self.options.embedding_dtype not in self.EMBEDDING_DTYPES:
            raise TaskError(f"--embedding-dtype {self.options.embedding_dtype!r}: choose one of {self.EMBEDDING_DTYPES}")

    def model_class(self):
        return RobertaModel, {"add_pooling_layer": self.options.pooling == "pooler"}

    def check_weights(self):
        try:
            super().check_weights()
        except CheckpointError as e:  # its hint is the Python API's (add_pooling_layer=False); here it is a flag
            raise CheckpointError(str(e).replace(NO_POOLER, "  (this checkpoint has no pooler: use --pooling mean or cls)")) from None

    def run(self, model, ids, mask, lengths, budget):
        e = sentence_embedding(encode(model, ids, mask, lengths), mask, self.options.pooling, self.options.normalize)
        # (B, H) in the stored dtype already, so that the finiteness check sees a float16 overflow
        return {"embedding": e.to(getattr(torch, self.options.embedding_dtype))}

    def columns(self, outputs):
        return {"embedding": fixed_list(outputs["embedding"])}


class FillMask(Task):
    """Column predictions: per <mask> in the row (in order), the top-k {token_id, token, probability}.
    Rows without a mask get an empty list. The LM head runs only at mask positions."""

    name, needs, outputs = "fill-mask", ("masked_lm",), ("predictions",)
    PREDICTION = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("probability", pa.float32())])

    def check_options(self, config):
        super().check_options(config)
        if self.options.top_k < 1:
            raise TaskError(f"--top-k {self.options.top_k}: must be at least 1")

    def model_class(self):
        return RobertaForMaskedLM, {}

    def load(self, dtype, device):
        self.tokenizer = RobertaTokenizer.from_pretrained(self.model_dir)
        return super().load(dtype, device)

    def run(self, model, ids, mask, lengths, budget):
        at_mask = ids == self.tokenizer.mask_token_id  # (B, T)
        logits = model.logits(encode(model.roberta, ids, mask, lengths).last_hidden_state, at_mask).float()  # (N masks, V)
        probs, top = torch.softmax(logits, -1).topk(min(self.options.top_k, logits.shape[-1]), dim=-1)
        per_row = np.split(np.arange(len(top)), np.cumsum(at_mask.sum(1).cpu().numpy())[:-1])
        top, probs = top.cpu().numpy(), probs.cpu().numpy()
        out = np.empty(len(ids), dtype=object)
        for row, masks in enumerate(per_row):
            out[row] = [
                [{"token_id": int(t), "token": self.tokenizer.decode([int(t)]), "probability": float(p)} for t, p in zip(top[m], probs[m])]
                for m in masks
            ]
        return {"predictions": out}

    def non_finite(self, outputs):
        return np.array([any(not np.isfinite(p["probability"]) for mask in row for p in mask) for row in outputs["predictions"]], bool)

    def columns(self, outputs):
        return {"predictions": pa.array(list(outputs["predictions"]), pa.list_(pa.list_(self.PREDICTION)))}


class Score(Task):
    """Columns log_likelihood (sum over scored tokens, natural log), num_tokens (scored tokens),
    perplexity = exp(-log_likelihood / num_tokens).

    Causal-LM checkpoints: every token after <s> is scored given its prefix. Masked-LM checkpoints:
    pseudo-log-likelihood (Salazar et al. 2020): each token between <s> and </s> is masked in turn
    and scored at its position. `method` says which, and goes into the run summary.

    Long documents are truncated by default. With `stride` they are scored whole: windows of the
    model's full length advance `stride` tokens and each token is scored once, in the first window
    that reaches it, with the window's earlier tokens as context (transformers' perplexity recipe;
    for pseudo-LL the context is the whole window). Windows after the first carry no <s>.
    Neither method builds (tokens, V) logits for a whole batch: the LM head runs in chunks over the
    scored positions only."""

    name, needs, outputs = "score", ("causal_lm", "masked_lm"), ("log_likelihood", "num_tokens", "perplexity")
    splits_rows = True

    def __init__(self, model_dir, options):
        super().__init__(model_dir, options)
        self.method = "causal" if "causal_lm" in checkpoint_heads(model_dir) else "pseudo"

    def check_options(self, config):  # not the base class's: --stride is score's own option
        stride, window = self.options.stride, config.max_tokens
        if stride is not None and not 0 < stride < window:
            raise TaskError(f"--stride {stride}: must be between 1 and the window ({window} tokens) minus 1")
        if self.method == "causal" and not config.is_decoder:
            # Its attention would see the tokens it scores: log-likelihoods near 0, silently wrong.
            raise TaskError(f"{self.model_dir}/config.json names a causal LM but has is_decoder false, so its attention "
                            "is bidirectional and would see every token it scores; set is_decoder to true if the "
                            "model was trained left to right")  # fmt: skip

    def model_class(self):
        return (RobertaForCausalLM if self.method == "causal" else RobertaForMaskedLM), {}

    def load(self, dtype, device):
        if self.method == "pseudo":
            self.mask_token_id = RobertaTokenizer.from_pretrained(self.model_dir).mask_token_id
        model = super().load(dtype, device)
        self.window = model.config.max_tokens
        return model

    def cost(self, length):
        return length if self.method == "causal" else length * max(length - 2, 1)

    def windows(self, n: int) -> list[tuple[int, int, int, int]]:
        """(begin, end, first target, end of targets) per window over a row of n tokens. Targets
        skip <s> (and, for pseudo-LL, </s>); each target lies in exactly one window."""
        last = n if self.method == "causal" else n - 1
        out, begin, done = [], 0, 1
        while True:
            end = min(begin + self.window, n)
            out.append((begin, end, done, max(done, min(end, last))))
            if end >= n or self.options.stride is None:
                return out
            done, begin = end, begin + self.options.stride

    def run(self, model, ids, mask, lengths, budget):
        # One job per window (causal) or per masked copy (pseudo): (row, begin, end, targets).
        jobs = []
        for row, n in enumerate(lengths.tolist()):
            for begin, end, first, stop in self.windows(n):
                if self.method == "causal" and stop > first:
                    jobs.append((row, begin, end, list(range(first, stop))))
                else:
                    jobs += [(row, begin, end, [t]) for t in range(first, stop)]
        lp, scored_rows = [], []
        for chunk in micro_chunks(jobs, budget):
            # The chunk's (C, width) windows as indices into the flat ids, laid out with numpy and
            # copied asynchronously (`to_device`): a copy per window was a kernel launch each on a
            # GPU, and reading anything back from the device, or a copy from unpinned memory, makes
            # the host wait for the GPU.
            row, begin, end = (np.array(x) for x in zip(*[w[:3] for w in chunk]))
            widths = end - begin  # (C,)
            offsets = np.arange(widths.max())
            inside = offsets < widths[:, None]  # (C, width)
            # (C, width) positions in the flat ids; past a window's end, its last token (masked out)
            source = row[:, None] * ids.shape[1] + np.minimum(begin[:, None] + offsets, end[:, None] - 1)
            window = np.repeat(np.arange(len(chunk)), [len(w[3]) for w in chunk])  # (N,) the window of each target
            at = np.concatenate([w[3] for w in chunk]) - begin[window]  # (N,) the target's position in it
            scored_rows.append(row[window])
            source, inside, window, at = (to_device(x, ids.device) for x in (source, inside, window, at))
            window_ids = ids.reshape(-1)[source].masked_fill(~inside, model.config.pad_token_id)  # (C, width)
            window_mask = inside.long()
            targets = window_ids[window, at]
            if self.method == "causal":  # token t is predicted by the state at t-1
                hidden = encode(model.roberta, window_ids, window_mask, widths).last_hidden_state[window, at - 1]  # (N, H)
            else:  # by the masked state at t, one target (N = C) per copy: the last layer runs only there
                window_ids[window, at] = self.mask_token_id
                hidden = model.roberta.hidden_at(window_ids, window_mask, at[:, None], widths)[:, 0]  # (C, H)
            lp.append(self.token_log_probs(model, hidden, targets))
        rows = np.concatenate(scored_rows) if scored_rows else np.zeros(0, dtype=np.int64)  # (all N,) host
        lp = torch.cat(lp) if lp else torch.zeros(0, device=ids.device)
        ll = torch.zeros(len(ids), dtype=torch.float64, device=ids.device).index_add_(0, to_device(rows, ids.device), lp.double())
        return {"log_likelihood": ll, "num_tokens": np.bincount(rows, minlength=len(ids))}

    def token_log_probs(self, model, hidden, targets):
        """hidden (N, H), targets (N,) -> log p(target) (N,) float32, in chunks of positions whose
        (chunk, V) float32 logits stay within LM_HEAD_CHUNK_BYTES."""
        chunk = max(1, LM_HEAD_CHUNK_BYTES // (4 * model.config.vocab_size))
        out = []
        for i in range(0, len(targets), chunk):
            log_probs = torch.log_softmax(model.logits(hidden[i : i + chunk]).float(), -1)  # (chunk, V)
            out.append(log_probs.gather(-1, targets[i : i + chunk, None])[:, 0])
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    def columns(self, outputs):
        ll, n = outputs["log_likelihood"], outputs["num_tokens"]
        with np.errstate(divide="ignore", invalid="ignore"):
            ppl = np.where(n > 0, np.exp(-ll / np.maximum(n, 1)), np.nan)
        return {
            "log_likelihood": pa.array(ll, pa.float64()),
            "num_tokens": pa.array(n, pa.int32()),
            "perplexity": pa.array(ppl, pa.float64()),
        }


def micro_chunks(jobs: list, budget: int) -> list[list]:
    """Consecutive jobs (row, begin, end, targets) cut so that jobs x widest window <= budget tokens."""
    chunks, current, width = [], [], 0
    for job in jobs:
        w = max(width, job[2] - job[1])
        if current and (len(current) + 1) * w > budget:
            chunks.append(current)
            current, w = [], job[2] - job[1]
        current.append(job)
        width = w
    return chunks + ([current] if current else [])


def fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) numpy -> Arrow fixed_size_list<D>, zero-copy from the flat buffer."""
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


TASKS: dict[str, type[Task]] = {t.name: t for t in (Classify, Embed, FillMask, Score)}


def make_task(name: str, model_dir: str, options: TaskOptions | None = None) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](model_dir, options or TaskOptions())
