"""`rayberta <task> --model DIR --input URI --output URI [options]`: one job, Parquet in, Parquet out.
`rayberta benchmark [options]`: the throughput benchmark (jobs/benchmark.py; `rayberta benchmark --help`).

Without RAY_ADDRESS or --address it starts an embedded local Ray sized to this machine; with one,
it runs on that cluster. Prints the run summary as JSON, alone on stdout (also written to
OUTPUT/_summary.json); Ray's and the job's messages go to stderr.
Exit status: 0 done; 1 a job interrupted by a fault (rerun it: finished shards are kept); 2 what
must be fixed first (input, checkpoint, flags, output), said in one line without a traceback.
Rerunning a command resumes it: shards finished with the same model and settings are kept, new,
changed or unfinished ones run (exactly once per input row; see pipeline/shards.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback

try:  # s3fs's client library, whose errors (no credentials, no endpoint) are not OSErrors
    from botocore.exceptions import BotoCoreError
except ImportError:  # an install without S3 support (the GPU check's minimal one)
    BotoCoreError = OSError

from pipeline import JobInterrupted, Options, TaskOptions, run
from pipeline.runner import DTYPES, own_ray_connection
from pipeline.tasks import POOLINGS, TASKS, Embed


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    io = common.add_argument_group("data")
    io.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors, tokenizer.json)")
    io.add_argument("--input", required=True, nargs="+", help="Parquet file(s), directory, glob or s3:// prefix")
    io.add_argument("--output", required=True, help="output directory or s3:// prefix for Parquet results")
    io.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    io.add_argument("--pair-column", default=None, help="second text of a pair, for NLI / cross-encoder checkpoints")
    io.add_argument("--id-column", default="id", help="id column kept in the output (default: id; when a column named id is absent, ids are derived from file and row)")
    io.add_argument("--keep-columns", default="", help="comma-separated input columns copied to the output; name:new_name renames one (e.g. label:gold_label)")
    io.add_argument("--overwrite", action="store_true", help="replace results already in --output (default: keep finished shards, run the rest)")
    io.add_argument("--prune", action="store_true",
                    help="delete the results of input files no longer listed (deleted or renamed since); default: keep them, listed as stale_shards")
    io.add_argument("--skip-bad-files", action="store_true", help="run without input files that are not readable Parquet; the summary lists them")
    io.add_argument("--max-failed-fraction", type=float, default=0.01,
                    help="stop with an error when more than this fraction of rows fails (default: 0.01); failures are in the `error` column")
    io.add_argument("--storage-options", default="{}", help='JSON options for fsspec, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    run_ = common.add_argument_group("execution")
    run_.add_argument("--max-length", type=int, default=None, help="truncate texts to N tokens (default: the model's positions)")
    run_.add_argument("--batch-tokens", type=int, default=None,
                      help="token budget of one micro-batch (padded tokens); default: chosen from the device and the model")
    run_.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model weights and compute dtype")
    run_.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: GPUs when the cluster has them")
    run_.add_argument("--concurrency", type=int, default=None, help="inference actors (default: one per GPU, or one on CPU)")
    run_.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    p = argparse.ArgumentParser(prog="rayberta", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    classify = tasks.add_parser("classify", parents=[common], help="label texts with a sequence-classification checkpoint")
    classify.add_argument("--threshold", type=float, default=TaskOptions.threshold, help="multi-label: keep labels with probability >= threshold")
    classify.add_argument("--logits", action="store_true", help="also write raw logits")
    embed = tasks.add_parser("embed", parents=[common], help="sentence embeddings from the base model")
    embed.add_argument("--pooling", default=TaskOptions.pooling, choices=POOLINGS, help="how token states become one vector")
    embed.add_argument("--normalize", action="store_true", help="L2-normalise embeddings")
    embed.add_argument("--embedding-dtype", default=TaskOptions.embedding_dtype, choices=Embed.EMBEDDING_DTYPES, help="stored embedding dtype")
    fill = tasks.add_parser("fill-mask", parents=[common], help="top-k predictions for every <mask> token")
    fill.add_argument("--top-k", type=int, default=TaskOptions.top_k, help="predictions per mask")
    score = tasks.add_parser("score", parents=[common], help="log-likelihood and perplexity (causal LM, or pseudo-LL for masked LM)")
    score.add_argument("--stride", type=int, default=None,
                       help="score long documents whole with sliding windows advancing N tokens (default: truncate)")
    # Only listed here: `main` hands its flags to jobs.benchmark's own parser.
    tasks.add_parser("benchmark", add_help=False, help="throughput against transformers and the hardware limit (see its --help)")
    assert set(tasks.choices) == set(TASKS) | {"benchmark"}
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["benchmark"]:
        from jobs.benchmark import cli as benchmark

        return benchmark(argv[1:], prog="rayberta benchmark")
    cli = parser()
    args = cli.parse_args(argv)
    try:
        storage_options = json.loads(args.storage_options)
    except json.JSONDecodeError as e:
        cli.error(f"--storage-options {args.storage_options!r} is not valid JSON ({e}); e.g. '{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'")
    if not isinstance(storage_options, dict):
        cli.error(f"--storage-options {args.storage_options!r} must be a JSON object, e.g. '{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}'")
    task_options = TaskOptions(**{k: v for k, v in vars(args).items() if k in TaskOptions.__dataclass_fields__})
    options = Options(
        task=args.task, model=args.model, text_column=args.text_column, pair_column=args.pair_column,
        id_column=args.id_column, keep_columns=tuple(c for c in args.keep_columns.split(",") if c),
        max_length=args.max_length, batch_tokens=args.batch_tokens, dtype=args.dtype, device=args.device,
        concurrency=args.concurrency, task_options=task_options,
    )  # fmt: skip
    # stdout carries the summary only (a script may parse it): Ray prints its raylet's warnings to
    # Python's stdout, so what the run prints goes to stderr, Ray's last words included.
    try:
        with contextlib.redirect_stdout(sys.stderr), own_ray_connection():
            summary = run(args.input, args.output, options, overwrite=args.overwrite, storage_options=storage_options,
                          address=args.address, skip_bad_files=args.skip_bad_files,
                          max_failed_fraction=args.max_failed_fraction, prune=args.prune)  # fmt: skip
    except JobInterrupted as e:  # a fault, or a bug: the traceback first, then what to do
        traceback.print_exception(e.__cause__ or e)
        print(f"rayberta: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError, BotoCoreError) as e:  # each says what and what to do; a bug keeps its traceback
        print(f"rayberta: error: {type(e).__name__ + ': ' if isinstance(e, BotoCoreError) else ''}{e}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
