"""Wires the stages into Ray Data and runs a job. Every Ray setting of the project lives here.

    read_parquet -> Tokenize (CPU actors) -> Infer (GPU actors, or CPU) -> write_parquet

Choices a user may want to know:
- Output rows map one-to-one to input rows and carry the id column. When the input has no id
  column (and --id-column was left at its default), the id is Ray Data's `row_hash`: a uint64 of
  the file path and the row's position in the file, stable across reruns over the same paths.
- Every output also carries `input_tokens` (tokens the model saw, specials included) and
  `truncated`; the run summary is computed from the written output, so it counts what was written.
- Null texts are processed as empty strings; the summary counts rows whose text produced no tokens.
- Ray resources are logical reservations, not thread limits: a tokenizer actor reserves 1/8 CPU,
  a CPU inference actor 1/4 CPU (its torch threads still use the node's cores), a GPU inference
  actor one GPU. They stay small because Ray Data's own tasks (file listing, projections: 1 CPU
  each) must still fit beside the actor pools, even with two chained jobs on a 2-CPU machine;
  bigger reservations deadlock there (measured: 1/2 + 1 CPU per job hangs).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from model import RobertaTokenizer
from pipeline import storage
from pipeline.stages import Infer, InputError, Tokenize, is_text
from pipeline.tasks import TaskOptions, make_task

DEFAULT_ID = "id"
NO_TRUNCATION = 2**31 - 1
ROWS_PER_BLOCK = 1024  # rows per Infer call: more rows sort into tighter micro-batches


@dataclass(frozen=True)
class Options:
    """Everything that defines a job except where the data lives."""

    task: str
    model: str
    text_column: str = "text"
    pair_column: str | None = None
    id_column: str = DEFAULT_ID
    keep_columns: tuple[str, ...] = ()
    max_length: int | None = None
    batch_tokens: int = 8192
    dtype: str = "float32"
    device: str = "auto"
    concurrency: int | None = None  # inference actors; default one per GPU, or one on CPU
    task_options: TaskOptions = field(default_factory=TaskOptions)


@dataclass
class Summary:
    task: str
    output: str
    rows: int
    tokens: int
    truncated_rows: int
    empty_texts: int
    wall_seconds: float
    tokens_per_second: float
    ray_start_seconds: float
    method: str | None = None  # score: "causal" or "pseudo" (pseudo-log-likelihood)

    def to_dict(self) -> dict:
        return asdict(self)


def init_ray(address: str | None = None) -> float:
    """Connect to RAY_ADDRESS / --address, or start an embedded local Ray sized to this machine.
    Returns the seconds it took (reported apart from the job's own time)."""
    if ray.is_initialized():
        return 0.0
    start = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - start


def use_gpu(device: str) -> bool:
    return device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def build(ds: ray.data.Dataset, options: Options) -> ray.data.Dataset:
    """Tokenize + infer a dataset holding the text (and id / keep) columns; returns the output columns."""
    gpu = use_gpu(options.device)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = options.concurrency or (int(ray.cluster_resources().get("GPU", 1)) if gpu else 1)
    # With --stride the score task windows long documents itself: tokenize them whole.
    max_length = NO_TRUNCATION if options.task_options.stride else options.max_length
    ds = ds.map_batches(
        Tokenize,
        fn_constructor_kwargs=dict(model_dir=options.model, text_column=options.text_column,
                                   pair_column=options.pair_column, max_length=max_length),  # fmt: skip
        batch_format="pyarrow",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=max(1, cpus // 4) if gpu else 1),
        num_cpus=0.125,
    )
    return ds.map_batches(
        Infer,
        fn_constructor_kwargs=dict(model_dir=options.model, task=options.task, options=options.task_options,
                                   dtype=options.dtype, device="cuda" if gpu else "cpu",
                                   batch_tokens=options.batch_tokens),  # fmt: skip
        batch_format="pyarrow",
        batch_size=ROWS_PER_BLOCK,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpu else 0,
        num_cpus=1 if gpu else 0.25,
    )


def empty_text_tokens(options: Options) -> int:
    """How many tokens an empty text (or pair of empty texts) becomes: just the special tokens."""
    tokenizer = RobertaTokenizer.from_pretrained(options.model)
    return len(tokenizer.encode_batch([""], [""] if options.pair_column else None)[0])


def check_schema(schema: pa.Schema, options: Options, source: str) -> bool:
    """Early, clear errors for the columns a job needs. Returns whether the id must be derived."""
    names = schema.names
    for role, name in [("--text-column", options.text_column), ("--pair-column", options.pair_column)]:
        if name is None:
            continue
        if name not in names:
            raise InputError(f"{source}: no column {name!r} ({role}); available columns: {names}")
        if not is_text(schema.field(name).type):
            raise InputError(f"{source}: column {name!r} ({role}) has type {schema.field(name).type}, expected string")
    missing = [c for c in options.keep_columns if c not in names]
    if missing:
        raise InputError(f"{source}: --keep-columns {missing} not found; available columns: {names}")
    if options.id_column in names:
        return False
    if options.id_column != DEFAULT_ID:
        raise InputError(f"{source}: no id column {options.id_column!r} (--id-column); available columns: {names}")
    return True


def run(input: str | list[str], output: str, options: Options, overwrite: bool = False,
        storage_options: dict | None = None, address: str | None = None) -> Summary:  # fmt: skip
    """Run one job: Parquet in, Parquet out, summary JSON next to the output. Used by CLI and jobs."""
    task = make_task(options.task, options.model, options.task_options)
    task.check()
    fs, files = storage.parquet_files(input, storage_options)
    in_fs = storage.arrow_filesystem(fs)
    dataset = pads.dataset(files, filesystem=in_fs, format="parquet")
    derive_id = check_schema(dataset.schema, options, files[0])
    if dataset.count_rows() == 0:
        raise InputError(f"input {input} holds no rows ({len(files)} Parquet file(s), all empty)")
    out_fs, out_path = storage.prepare_output(output, overwrite, storage_options)

    ray_start = init_ray(address)
    start = time.perf_counter()
    columns = [options.text_column, options.pair_column, *options.keep_columns] + ([] if derive_id else [options.id_column])
    ds = ray.data.read_parquet(
        files, filesystem=in_fs, columns=list(dict.fromkeys(c for c in columns if c)),
        include_row_hash=derive_id, num_cpus=0.25,
    )  # fmt: skip
    if derive_id:
        ds = ds.rename_columns({"row_hash": options.id_column})
    build(ds, options).write_parquet(out_path, filesystem=storage.arrow_filesystem(out_fs), ray_remote_args={"num_cpus": 0.25})
    wall = time.perf_counter() - start

    written = pq.ParquetDataset(out_path, filesystem=storage.arrow_filesystem(out_fs)).read(columns=["input_tokens", "truncated"])
    tokens = int(pa.compute.sum(written["input_tokens"]).as_py() or 0)
    specials = empty_text_tokens(options)
    summary = Summary(
        task=options.task,
        output=output,
        rows=written.num_rows,
        tokens=tokens,
        truncated_rows=int(pa.compute.sum(written["truncated"]).as_py() or 0),
        empty_texts=int(pa.compute.sum(pa.compute.less_equal(written["input_tokens"], specials)).as_py() or 0),
        wall_seconds=round(wall, 3),
        tokens_per_second=round(tokens / wall, 1),
        ray_start_seconds=round(ray_start, 3),
        method=getattr(task, "method", None),
    )
    storage.write_summary(out_fs, out_path, summary.to_dict())
    return summary
