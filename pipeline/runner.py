"""Wires the stages into Ray Data and runs a job. Every Ray setting of the project lives here.

    read_parquet -> Tokenize (CPU actors) -> Infer (GPU actors, or CPU) -> write pieces -> commit per shard

Choices a user may want to know:
- Output rows map one-to-one to input rows and carry the id column. When the input has no id
  column (and --id-column was left at its default), the id is Ray Data's `row_hash`: a uint64 of
  the file path and the row's position in the file, stable across reruns over the same paths.
- Every job is resumable and incremental, exactly once per input row: see pipeline/shards.py.
- Every output also carries `input_tokens` (tokens the model saw, specials included), `truncated`
  and `error` (null, or why the row failed: its task columns are then null). The run summary is
  computed from the commit markers, so it counts what was written.
- Null texts are processed as empty strings; the summary counts rows whose text produced no tokens.
- Ray resources are logical reservations, not thread limits: a tokenizer actor reserves 1/8 CPU,
  a CPU inference actor 1/4 CPU (its torch threads still use the node's cores), a GPU inference
  actor one GPU. They stay small because Ray Data's own tasks (file listing, projections: 1 CPU
  each) must still fit beside the actor pools, even with two chained jobs on a 2-CPU machine;
  bigger reservations deadlock there (measured: 1/2 + 1 CPU per job hangs).
- A CPU inference actor's process starts with jemalloc (shipped with Ray) as its allocator and
  with oneDNN's and torch's matmul caches capped (`cpu_inference_env`, measured below): its memory
  stays flat over a job of any length. Variables the driver's environment sets pass on instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch

from model import RobertaTokenizer
from model.loading import DTYPES
from pipeline import shards, storage, workers
from pipeline.stages import Infer
from pipeline.tokenize import ADDED_COLUMNS, InputError, Tokenize, is_text
from pipeline.storage import Shard
from pipeline.tasks import Task, TaskError, TaskOptions, make_task

DEFAULT_ID = "id"
PATH = "path"  # Ray Data's column naming each row's input file (include_paths)
ROW_HASH_TYPE = pa.uint64()  # of Ray Data's row_hash, the derived id
NO_TRUNCATION = 2**31 - 1
ROWS_PER_BLOCK = 1024  # rows per block from the reader to the tokenizers
COMMIT_THREADS = 8  # shards committing at once (each mostly waits for its merge task)
# Ids the driver reads to count duplicates over the whole output: 5M int64 ids took 6 s and 1.8 GB
# there (pyarrow's hash table); beyond, Ray Data's distributed groupby counts them (`duplicate_ids`).
DRIVER_IDS = 5_000_000
FOOTER_THREADS = 32  # footers read at once (two small requests each on S3)
# Rows per Infer call, by device. A call sorts its rows by length and cuts them by the token budget;
# the micro-batches come out tight only when the call holds many budgets of tokens. Padding of the
# movie reviews (about 200 tokens a row) measured with `stages.micro_batches`: CPU budget 4,096,
# 1,024-row calls: 2.9%; GPU budget 65,536: 25.5% with 1,024-row calls, 3.0% with 16,384. (Chosen
# while a GPU's layers computed the pads; since they skip them (model.roberta.UNPADDED_DEVICES),
# smaller GPU calls may do as well: not measured.) Results (and shard commits) stream a call at a
# time. With several GPUs, a job of fewer than 16,384 rows per GPU leaves some of them idle.
INFER_ROWS = {"cpu": ROWS_PER_BLOCK, "cuda": 16 * ROWS_PER_BLOCK}

# The CPU inference actor's process starts with these variables (its runtime_env): the libraries
# read them once, the allocator at the process's start, the caches at its first matmul.
#
# CPU matmuls (bf16's, and fp32's since model/cpu_fusion.py) run as oneDNN primitives, one per
# (tokens, in, out, post-op) shape, and two caches keep them per process: oneDNN's own (up to
# 1,024 primitives) and torch's (ideep's LRU cache of matmul set-ups, also 1,024). Length-sorted
# micro-batches bring new token counts nearly every time, so both kept growing, and their blocks,
# interleaved with freed activations, fragmented the heap.
# Measured in-process (classify small, bf16, calls of 1,024 different rows; glibc's mallinfo2):
# as is, peak private memory 983 -> 2,064 MiB over 12 calls and still rising (in use 252 -> 557
# MiB); oneDNN's cache at 32, 1,122-1,169 MiB from the fourth call but in use still +8 MiB a call;
# both at 32, in use flat at 177 MiB and the peak 710-818 MiB over 8 calls, at the same speed. A
# micro-batch needs about 7 shapes, reused over its layers; with no cache at all every layer builds
# its primitives again (12-15% slower). (Measured before the fp32 fusion; with it, end to end over
# 33x the rows, the inference actor's peak private memory stayed at 406 -> 421 MiB.)
SHAPE_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
SHAPE_CACHE_CAPACITY = 32
#
# Its allocator is jemalloc (shipped with Ray), keeping freed pages for reuse. Under glibc's malloc,
# with both caches capped, the actor's memory in use stayed at 143 MiB while the free memory its heap
# held grew call after call, 381 -> 572 MiB over ten calls of 1,024 rows (classify small, fp32, end
# to end; peak private memory 753 -> 947 MiB): micro-batches of ever-new sizes fragment glibc's heap.
# Measured side by side, the same job at 3,000 rows: the actor's peak private memory 430 MiB with
# jemalloc against 997-1,044 with glibc, at 5,857 and 6,311 tokens/s against 6,114 and 6,099. The
# model stage alone, in fresh processes, two runs each: classify small fp32 6,933 / 6,938 tokens/s
# against 6,625 / 6,731; bf16 11,313 / 10,321 against 10,595 / 11,265; pseudo-LL bf16 274 / 269
# against 217 / 242 (its (chunk, V) log-softmax blocks reuse memory instead of faulting pages in).
# Without decay: with jemalloc's default decay, tried for every process of a job, freed pages went
# back to the kernel and faulted in again at the next micro-batch (the job 18-26% slower).
JEMALLOC = Path(ray.__file__).parent / "core" / "libjemalloc.so"


def cpu_inference_env() -> dict[str, str]:
    """The CPU inference actor's environment variables (the benchmark's model stage runs in a process
    started with them too). A variable already set in the driver's environment passes on with that
    value; a driver with an LD_PRELOAD of its own gets no jemalloc added (its preload is the user's
    choice), nor does a Ray without jemalloc.
    The library's path is the driver's: a worker node whose Ray lies elsewhere warns and keeps glibc."""
    env = {variable: str(SHAPE_CACHE_CAPACITY) for variable in SHAPE_CACHES}
    if JEMALLOC.exists() and "LD_PRELOAD" not in os.environ:
        env |= {"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    return {variable: os.environ.get(variable, value) for variable, value in env.items()}


def inference_remote_args(gpu: bool) -> dict:
    """Ray remote arguments of an inference actor (see the module docstring for the CPU shares)."""
    if gpu:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": 0.25, "runtime_env": {"env_vars": cpu_inference_env()}}


def inference_pool(actors: int) -> ray.data.ActorPoolStrategy:
    """The inference actors: each takes one call at a time and runs it in its own thread, the one
    that built the model. By default Ray Data runs a call in a thread of its own, and there a bf16
    model computed on 1.5-1.7 of 2 cores and 15-20% slower (measured: Infer built in the main
    thread, called in a ThreadPoolExecutor's; fp32 was not slowed)."""
    return ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=1, enable_true_multi_threading=True)


class JobInterrupted(RuntimeError):
    """A job stopped by a fault; a rerun of the same command resumes it."""


@dataclass(frozen=True)
class Options:
    """Everything that defines a job except where the data lives."""

    task: str
    model: str
    text_column: str = "text"
    pair_column: str | None = None
    id_column: str = DEFAULT_ID
    keep_columns: tuple[str, ...] = ()  # input columns copied to the output; "label:gold_label" renames (`kept`)
    max_length: int | None = None
    batch_tokens: int | None = None  # micro-batch token budget; None: chosen from the device (stages.token_budget)
    dtype: str = "float32"
    device: str = "auto"
    concurrency: int | None = None  # inference actors; default one per GPU, or one on CPU
    task_options: TaskOptions = field(default_factory=TaskOptions)

    @property
    def kept(self) -> dict[str, str]:
        """keep_columns as {input column: its name in the output}: "label:gold_label" keeps the
        input's `label` as `gold_label` (a gold label beside the predicted one)."""
        return dict(c.split(":", 1) if ":" in c else (c, c) for c in self.keep_columns)


@dataclass
class Summary:
    """The run report, also written to OUTPUT/_summary.json. Counts cover the whole output (finished
    shards of earlier runs included, stale ones too); `*_run` and the speed cover this run."""

    task: str
    output: str
    rows: int
    tokens: int
    truncated_rows: int
    empty_texts: int
    failed_rows: int  # rows with an `error` (their task columns are null)
    duplicate_ids: int  # rows beyond the first with their id, over the whole output
    null_ids: int  # rows whose id is null (not counted as duplicates): nothing joins them back
    shards: int
    shards_run: int  # new, changed or unfinished shards processed by this run
    shards_reused: int  # finished by an earlier run and left as they were
    rows_run: int
    wall_seconds: float
    tokens_per_second: float  # tokens of this run's rows / wall_seconds
    ray_start_seconds: float
    plan_seconds: float  # the driver's work before data moves: listing, markers, footers, checks
    method: str | None = None  # score: "causal" or "pseudo" (pseudo-log-likelihood)
    skipped_files: list[dict] = field(default_factory=list)  # --skip-bad-files: {file, error}
    abandoned_files: list[str] = field(default_factory=list)  # result files no marker named, deleted before running
    stale_shards: list[str] = field(default_factory=list)  # inputs no longer listed whose results stay (counted above)
    pruned_shards: list[str] = field(default_factory=list)  # inputs no longer listed whose results --prune deleted
    output_digest: str = ""  # of the commit markers the counts cover: equal digests, the same output

    def to_dict(self) -> dict:
        return asdict(self)


def init_ray(address: str | None = None, filesystems=()) -> float:
    """Connect to RAY_ADDRESS / --address, or start an embedded local Ray sized to this machine,
    whose workers import what tasks need (Ray Data, the job's fsspec `filesystems`) as they start
    when a filesystem is remote, before a cancelled task can break that import (pipeline/workers.py).
    A Ray already initialized is used as it is: whoever started it passes `workers.runtime_env(...)`
    to `ray.init` there.
    Returns the seconds it took (reported apart from the job's own time)."""
    if ray.is_initialized():
        return 0.0
    start = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = workers.runtime_env(filesystems)
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    return time.perf_counter() - start


@contextmanager
def own_ray_connection():
    """For a process that runs one job (the CLI): a Ray connection made inside the block is left
    as it ends (an embedded Ray stops), so that Ray prints its last lines (a cluster's warnings
    about a lost actor, say) inside the block, not after the job's own output. A Ray connected
    before the block (a notebook's, a test session's) stays."""
    connected = ray.is_initialized()
    try:
        yield
    finally:
        if not connected and ray.is_initialized():
            ray.shutdown()


def check_device(device: str, address: str | None) -> None:
    """--device cuda where the job would start an embedded Ray on a machine without a GPU: an error,
    as its inference actors would wait for one forever. A cluster (an address, or a Ray already
    running) is not checked: its autoscaler may add GPU nodes on demand."""
    if device != "cuda" or address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but this machine has no GPU (and no Ray cluster was given, so the job would "
                           "run on an embedded local Ray here); use --device auto or cpu, or --address of a cluster "
                           "with GPU nodes")  # fmt: skip


def use_gpu(device: str) -> bool:
    return device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def build(ds: ray.data.Dataset, options: Options) -> ray.data.Dataset:
    """Tokenize + infer a dataset holding the text (and id / keep) columns; returns the output columns."""
    gpu = use_gpu(options.device)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = options.concurrency or (int(ray.cluster_resources().get("GPU", 1)) if gpu else 1)
    # With --stride the score task windows long documents itself: tokenize them whole.
    max_length = NO_TRUNCATION if options.task_options.stride is not None else options.max_length
    # Blocks of at most ROWS_PER_BLOCK rows (a read task may concatenate whole files into one):
    # they spread over the tokenizer actors and stream; Infer takes INFER_ROWS of them at a time.
    ds = ds.repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
    ds = ds.map_batches(
        Tokenize,
        fn_constructor_kwargs=dict(model_dir=options.model, text_column=options.text_column,
                                   pair_column=options.pair_column, max_length=max_length,
                                   keep_columns=options.kept),  # fmt: skip
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
        batch_size=INFER_ROWS["cuda" if gpu else "cpu"],  # Ray Data joins blocks (of any shards) into a call
        compute=inference_pool(actors),
        **inference_remote_args(gpu),
    )


def check_job(options: Options, address: str | None = None) -> tuple[Task, int]:
    """What can be wrong with a job before any data moves, checked on the driver (in an actor it
    would surface only as a failed job): the task against the checkpoint and its options, the
    tokenizer's files, --max-length against the model's positions, --device (`check_device`).
    Returns the task and how many tokens an empty text (or pair of empty texts) becomes: its
    special tokens."""
    check_device(options.device, address)
    if options.dtype not in DTYPES:
        raise TaskError(f"--dtype {options.dtype!r}: choose one of {list(DTYPES)}")
    for flag, value in (("--batch-tokens", options.batch_tokens), ("--concurrency", options.concurrency)):
        if value is not None and value < 1:
            raise TaskError(f"{flag} {value}: must be at least 1; leave it out for the default")
    roles = [c for c in (options.text_column, options.pair_column, options.id_column) if c]
    if len(set(roles)) < len(roles):
        raise TaskError(f"--text-column, --pair-column and --id-column must name different columns, not {roles}")
    kept = options.kept
    if "" in {*kept, *kept.values()} or len(kept) < len(options.keep_columns) or len(set(kept.values())) < len(kept):
        raise TaskError(f"--keep-columns {','.join(options.keep_columns)}: name each input column once, as `name` or "
                        "`name:new_name`, and give each a different output name")  # fmt: skip
    if kept.get(options.id_column, options.id_column) != options.id_column:
        raise TaskError(f"--keep-columns: the id column {options.id_column!r} is written under its own name (results join "
                        "on it); keep it without a new name, or rename it in the input")  # fmt: skip
    task = make_task(options.task, options.model, options.task_options)
    config = task.check()
    task.check_weights()
    tokenizer = RobertaTokenizer.from_pretrained(options.model)
    specials = len(tokenizer.encode_batch([""], [""] if options.pair_column else None)[0])
    if options.max_length is not None:
        if options.task_options.stride is not None:
            raise TaskError("--max-length and --stride exclude each other: with --stride, score reads whole documents "
                            "in windows of the model's length")  # fmt: skip
        if not specials < options.max_length <= config.max_tokens:
            raise TaskError(f"--max-length {options.max_length}: must be more than the {specials} special tokens and at "
                            f"most the {config.max_tokens} positions of {options.model}")  # fmt: skip
    return task, specials


def check_schema(schema: pa.Schema, options: Options, task: Task, source: str) -> bool:
    """Early, clear errors for the columns a job needs. Returns whether the id must be derived."""
    names = schema.names
    for role, name in [("--text-column", options.text_column), ("--pair-column", options.pair_column)]:
        if name is None:
            continue
        if name not in names:
            raise InputError(f"{source}: no column {name!r} ({role}); available columns: {names}")
        if not is_text(schema.field(name).type):
            raise InputError(f"{source}: column {name!r} ({role}) has type {schema.field(name).type}, expected string")
    kept = options.kept
    missing = [c for c in kept if c not in names]
    if missing:
        raise InputError(f"{source}: --keep-columns {missing} not found; available columns: {names}")
    if PATH in (options.text_column, options.pair_column, options.id_column, *kept, *kept.values()):
        raise InputError(f"{source}: the column name {PATH!r} is reserved for the input path; rename that column "
                         "in the input, and give no kept column that name")
    written = (*ADDED_COLUMNS, *task.output_columns())
    clashes = [c for c in (options.id_column, *kept.values()) if c in written]
    if kept_as_id := [c for c, name in kept.items() if name == options.id_column and c != options.id_column]:
        clashes.append(f"{kept_as_id[0]}:{options.id_column} (the name of the id column)")
    if clashes:
        raise InputError(f"{source}: {clashes} would be written twice: this job adds columns of those names "
                         f"({list(written)}); keep them under another name (--keep-columns label:gold_label)")  # fmt: skip
    if options.id_column in names:
        id_type = schema.field(options.id_column).type
        if pa.types.is_nested(id_type) or pa.types.is_dictionary(id_type):
            raise InputError(f"{source}: id column {options.id_column!r} (--id-column) has type {id_type}; an id must be "
                             "a plain value (an integer or a string) that each row's results can be joined on")  # fmt: skip
        return False
    if options.id_column != DEFAULT_ID:
        raise InputError(f"{source}: no id column {options.id_column!r} (--id-column); available columns: {names}")
    return True


class Footer(NamedTuple):
    """What the driver keeps of a shard's Parquet footer: a whole FileMetaData takes about 7 KB,
    0.7 GB for 100,000 shards; this, with one schema object per distinct schema, a few dozen bytes."""

    num_rows: int
    schema: pa.Schema  # without metadata (pandas' differs per file), shared by equal ones


def read_footers(fs, pending: list[Shard], skip_bad_files: bool) -> tuple[dict[Shard, Footer], list[dict]]:
    """Row count and schema of each shard to run, read from its footer (concurrently: S3 round trips).
    A file that is not readable Parquet is a clear error, or with --skip-bad-files a report entry."""
    schemas: dict[pa.Schema, pa.Schema] = {}

    def footer(shard: Shard):
        try:
            with fs.open(shard.path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema().remove_metadata()
            return Footer(meta.num_rows, schemas.setdefault(schema, schema))
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged files
            return e

    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        footers = dict(zip(pending, pool.map(footer, pending)))
    bad = {s: e for s, e in footers.items() if isinstance(e, Exception)}
    if bad and not skip_bad_files:
        shard, error = next(iter(bad.items()))
        raise InputError(f"{shard.path}: not a readable Parquet file ({type(error).__name__}: {error}); "
                         f"{len(bad)} such file(s). Replace or remove it, or pass --skip-bad-files to run without it")  # fmt: skip
    skipped = [{"file": s.path, "error": f"{type(e).__name__}: {e}"} for s, e in bad.items()]
    return {s: m for s, m in footers.items() if s not in bad}, skipped


def check_shards(footers: dict[Shard, Footer], options: Options, task: Task) -> bool:
    """Every shard must give the job the same columns with the same types (mixed schemas are named,
    never silently cast). Returns whether the id must be derived."""
    first, derive_id, types = None, None, None
    for shard, meta in footers.items():
        schema = meta.schema
        derives = check_schema(schema, options, task, shard.path)
        used = [c for c in job_columns(options) if c in schema.names]
        shard_types = {c: schema.field(c).type for c in used}
        if first is None:
            first, derive_id, types = shard, derives, shard_types
        elif derives != derive_id or shard_types != types:
            raise InputError(f"mixed schemas: {shard.path} gives columns {shard_types} but {first.path} gives {types}; "
                             "every shard must have the same columns with the same types")  # fmt: skip
    return bool(derive_id)


def check_results_schema(out: shards.Output, kept: list[dict], todo: dict[Shard, Footer], derive_id: bool,
                         options: Options) -> None:  # fmt: skip
    """The shards to run give the columns already in the output the types the results there have
    (`check_shards` made them agree with each other): an output is read as one dataset, and one
    column of two types makes it unreadable. One footer read, of a result file that stays. Nor may
    the shards' ids be derived where the results' are the input's own, or the other way round."""
    shard, meta = next(iter(todo.items()))
    # Over results with rows: an empty shard's marker records the flag of a run with nothing to
    # derive. Markers before 2026-11-27 lack it.
    derived = {m["derived_id"] for m in kept if m["output"] and "derived_id" in m}
    if derived and derived != {derive_id}:
        ours, theirs = ("no id column, so its ids would be derived", "the input's own ids") if derive_id else \
            (f"an id column {options.id_column!r}", "ids derived from file and row")  # fmt: skip
        raise InputError(f"{shard.path} has {ours}, but the results already in {out.uri} hold {theirs}: the ids of one "
                         "output must mean one thing. Give every shard an id column or none, or write the job to a "
                         "new --output (--overwrite replaces the old results)")  # fmt: skip
    committed = next((m["output"] for m in kept if m["output"]), None)
    if committed is None:
        return
    existing = pq.read_schema(out.join(committed), filesystem=out.arrow_fs)
    schema = meta.schema
    for column, name in {options.id_column: options.id_column, **options.kept}.items():  # input column -> output name
        type_ = ROW_HASH_TYPE if derive_id and column == options.id_column else schema.field(column).type if column in schema.names else None
        if type_ is not None and name in existing.names and existing.field(name).type != type_:
            note = " (derived: the input has no id column)" if derive_id and column == options.id_column else ""
            raise InputError(f"{shard.path}: column {column!r} has type {type_}{note}, but the results already in "
                             f"{out.uri} hold it{'' if name == column else f' (as {name!r})'} as {existing.field(name).type} ({committed}): an output is read as one "
                             f"dataset, so every shard must give a column one type. Cast it in this file, or write the "
                             "job to a new --output (--overwrite replaces the old results)")  # fmt: skip


def job_columns(options: Options) -> list[str]:
    columns = [options.id_column, options.text_column, options.pair_column, *options.kept]
    return list(dict.fromkeys(c for c in columns if c))


def read_columns(options: Options, derive_id: bool) -> list[str]:
    """The columns a job reads from its input files (a derived id is Ray Data's, not a column)."""
    return [c for c in job_columns(options) if not (derive_id and c == options.id_column)]


def settings(options: Options) -> dict:
    """What, besides the model files, changes the results: recorded in every commit marker."""
    chosen = {k: v for k, v in asdict(options).items() if k not in ("model", "batch_tokens", "device", "concurrency")}
    return json.loads(json.dumps(chosen))  # as a marker stores it (tuples become lists)


def run(input: str | list[str], output: str, options: Options, overwrite: bool = False,
        storage_options: dict | None = None, address: str | None = None, skip_bad_files: bool = False,
        max_failed_fraction: float = 0.01, prune: bool = False) -> Summary:  # fmt: skip
    """Run one job, Parquet in, Parquet out, exactly once per input row (see pipeline/shards.py):
    shards finished by an earlier run with the same model and settings are reused, the rest run.
    A run that fails any number of rows above `max_failed_fraction` stops with an error.
    Results of shards no longer in the input (deleted or renamed since) stay and are listed as
    `stale_shards`, or with `prune` are deleted (`pruned_shards`)."""
    if not 0 <= max_failed_fraction <= 1:  # also refuses nan
        raise TaskError(f"--max-failed-fraction {max_failed_fraction}: must be between 0 and 1")
    planning = time.perf_counter()
    task, specials = check_job(options, address)
    fs, inputs = storage.parquet_files(input, storage_options, output=output)
    out = shards.Output(output, storage_options)
    out.check_ours(overwrite)
    job = {"model": shards.model_digest(options.model), "settings": settings(options)}
    with shards.Lease(out) as lease:
        markers, fetched = ({}, 0) if overwrite else out.markers()
        for marker in markers.values():
            check_same_job(marker, job, output)
        listed = {shards.shard_key(s.path) for s in inputs}
        stale = sorted(m["input"] for m in markers.values() if m["key"] not in listed)
        pruned = [markers.pop(k) for k in [k for k in markers if k not in listed]] if prune else []  # deleted below
        entries = out.entries()
        present = set(entries)
        finished = {m["key"]: m for m in markers.values() if m["output"] is None or m["output"] in present}
        pending = [s for s in inputs if not is_finished(s, finished.get(shards.shard_key(s.path)))]
        footers, skipped = read_footers(fs, pending, skip_bad_files)
        if not markers and footers and sum(m.num_rows for m in footers.values()) == 0:
            raise InputError(f"input {input} holds no rows ({len(inputs)} Parquet file(s), all empty)")
        todo = {s: m for s, m in footers.items() if m.num_rows}
        derive_id = check_shards(todo, options, task) if todo else False  # before Ray starts: a bad column fails fast
        if todo:
            redone = {shards.shard_key(s.path) for s in footers}
            check_results_schema(out, [m for k, m in finished.items() if k not in redone], todo, derive_id, options)
        if overwrite:  # only once the input has passed its checks
            out.clear(entries)
            entries = []
        elif pruned:  # likewise; the markers first: a kill in between leaves files without one, which `clean` deletes
            out.remove_all([out.join(shards.MANIFEST, f"{m['key']}.json") for m in pruned])
            gone = {m["output"] for m in pruned if m["output"]}
            out.remove_all([out.join(name) for name in gone])
            entries = [e for e in entries if e not in gone]
        abandoned = out.clean(markers, entries)
        start = time.perf_counter()
        plan = start - planning
        ray_start, method = 0.0, getattr(task, "method", None)
        if todo:
            ray_start = init_ray(address, [fs, out.fs])
            start = time.perf_counter()
        try:
            new = run_shards(fs, footers, derive_id, out, options, {**job, "run": lease.run, "derived_id": derive_id}, lease, storage_options,
                             max_failed_fraction, specials)  # fmt: skip
            out.drop_staging()
            finished.update({m["key"]: m for m in new})
            if fetched or new or (prune and stale):  # the next run then reads the markers in one GET
                try:
                    out.write_index({**markers, **{m["key"]: m for m in new}})
                except OSError as e:  # only a cache, and an older index stays safe to use: the job is done
                    warnings.warn(f"could not write the commit markers' index in {output} ({e}); the next run "
                                  "reads the markers one by one", RuntimeWarning, stacklevel=2)  # fmt: skip
            kept = [finished[k] for k in (shards.shard_key(s.path) for s in inputs) if k in finished]
            # A file skipped as unreadable keeps the results of its earlier, readable version: in the
            # output and its counts, but not reused (nor run).
            skipped_files = {e["file"] for e in skipped}
            skipped_kept = [m for m in kept if m["input"] in skipped_files]
            current = kept + [m for k, m in finished.items() if k not in listed]  # the whole output
            totals = {k: sum(m["counts"].get(k, 0) for m in current) for k in shards.COUNTS}  # older markers lack null_ids
            digest = output_digest(current)
            if current:
                totals["duplicate_ids"] = duplicate_ids(out, current, options.id_column, digest, new, address)
            wall = time.perf_counter() - start  # the whole-output duplicate count included
            # Over the listed input only: results of a deleted input must not fail every later run.
            check_failures(*(sum(m["counts"][k] for m in kept) for k in ("failed_rows", "rows")), max_failed_fraction, final=True)
            tokens_run = sum(m["counts"]["tokens"] for m in new)
            summary = Summary(task=options.task, output=output, **totals,
                              shards=len(inputs), shards_run=len(new), shards_reused=len(kept) - len(new) - len(skipped_kept),
                              rows_run=sum(m["counts"]["rows"] for m in new), wall_seconds=round(wall, 3),
                              tokens_per_second=round(tokens_run / wall, 1) if wall > 0 else 0.0,
                              ray_start_seconds=round(ray_start, 3), plan_seconds=round(plan, 3), method=method, skipped_files=skipped,
                              abandoned_files=abandoned, output_digest=digest,
                              **({"pruned_shards": stale} if prune else {"stale_shards": stale}))  # fmt: skip
            out.put(out.join(storage.SUMMARY_FILE), json.dumps(summary.to_dict(), indent=2).encode())
        except (InputError, shards.OutputLocked):
            raise
        except Exception as e:  # a lost node, a storage outage, a killed actor beyond retries...
            damaged = damaged_file(fs, innermost(e), read_columns(options, derive_id))
            if damaged is not None:
                raise damaged from e
            raise JobInterrupted(f"job writing {output} stopped: {root_cause(e)}\nShards committed before the failure are "
                                 "kept. If the cause was passing (a lost node, a storage outage), rerun the same command "
                                 "to run the rest (each input row ends up in the output exactly once)") from e  # fmt: skip
    return summary


def innermost(error: BaseException) -> BaseException:
    """Ray wraps a worker's error (RayTaskError's `cause`, Ray Data's UserCodeException's
    `__cause__`), and the wrappers' first lines name only the task: the error inside them all."""
    while isinstance(inner := getattr(error, "cause", None) or error.__cause__, BaseException) and inner is not error:
        error = inner
    return error


def root_cause(error: BaseException, limit: int = 2000) -> str:
    """The innermost error, as "Type: message"."""
    error = innermost(error)
    message = str(error).strip()
    return f"{type(error).__name__}: {message[:limit]}{' [...]' if len(message) > limit else ''}"


# What Ray Data appends to an error of its Parquet read (ray/data/_internal/util.py, Ray 2.60): the
# file it was reading. Should a later Ray word it otherwise, a damaged file is reported as any fault.
READ_FAILURE = re.compile(r"Failed to read fragment (.+?) after \d+/\d+ attempts")


def damaged_file(fs, error: BaseException, columns: list[str]) -> InputError | None:
    """After Ray Data failed reading a file whose footer had read (`read_footers`): the file is
    parsed again here, a row group at a time, from a local copy (fetched first: an error fetching
    it is the storage's, not the file's). If it does not parse, it is damaged and a rerun would fail
    the same way: an InputError naming it. If it parses, or cannot be fetched, or the driver runs
    out of memory, the cause was the storage or the cluster: None."""
    match = READ_FAILURE.search(str(error))
    if match is None:
        return None
    path = match.group(1)
    with tempfile.TemporaryDirectory() as scratch:
        local = path if storage.is_local(fs) else os.path.join(scratch, "shard.parquet")
        try:
            if local != path:
                fs.get_file(path, local)
            handle = open(local, "rb")  # a file gone or unreadable since is no damage either
        except Exception:  # noqa: BLE001 - the storage, not the file: a fault to rerun
            return None
        try:
            with handle:
                for _ in pq.ParquetFile(handle).iter_batches(columns=columns):
                    pass
        except (MemoryError, pa.ArrowMemoryError):
            return None
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged data
            cause = str(e).strip().splitlines()[0]
            return InputError(f"{path}: its footer reads but its data does not ({type(e).__name__}: {cause}); replace or "
                              "remove the file (--skip-bad-files judges files by their footers and cannot skip it)")  # fmt: skip
    return None


def check_same_job(marker: dict, job: dict, output: str) -> None:
    """Results of another model or other settings are never mixed with this job's: name what differs."""
    theirs = marker["settings"]
    changed = [f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in job["settings"].items() if theirs.get(k) != v]
    changed += [f"{k}: {v!r} there, not set now" for k, v in theirs.items() if k not in job["settings"]]
    if marker["model"] != job["model"]:
        changed.insert(0, f"model files: sha256 {marker['model'][:12]} there, {job['model'][:12]} now")
    if changed:
        raise FileExistsError(f"output {output} holds results of another model or other settings (made for {marker['input']}); "
                              f"they are never mixed. Differences: {'; '.join(changed)}. Choose a new --output, or pass "
                              "--overwrite to replace them")  # fmt: skip


def is_finished(shard: Shard, marker: dict | None) -> bool:
    return marker is not None and marker["input"] == shard.path and (marker["size"], marker["version"]) == (shard.size, shard.version)


def run_shards(fs, footers: dict[Shard, Footer], derive_id: bool, out: shards.Output, options: Options,
               marker: dict, lease: shards.Lease, storage_options: dict | None, max_failed_fraction: float,
               specials: int) -> list[dict]:  # fmt: skip
    """Stream the shards through the pipeline and commit each as soon as all its rows are written.
    Commits run on driver threads while inference goes on; a shard of several pieces waits for a
    Ray task to merge them (`shards.merge`: the results' bytes never pass through the driver, whose
    part is a few small requests per shard). Returns the new markers.
    derive_id: `check_shards`'s answer; specials: the tokens of an empty text (`check_job`), to
    count empty texts. A shard whose rows did not all come back is an error, never a silent loss."""
    by_key = {shards.shard_key(s.path): s for s in footers}
    expected = {k: footers[s].num_rows for k, s in by_key.items()}
    # I/O bound, like the writes of the pieces; idempotent (a new staged file each try), so a
    # passing storage error is retried.
    merge = ray.remote(num_cpus=0.25, retry_exceptions=[OSError])(shards.merge)

    def commit(shard: Shard, pieces: list[str], counts: list[dict]) -> dict:
        staged, total = shards.stage_result(
            pieces, counts, lambda several: ray.get(merge.remote(out.uri, storage_options, shard.path, several, options.id_column)))
        lease.check()  # after the merge's wait: another job may have taken the output meanwhile
        return out.commit(shard, pieces, staged, total, marker)

    with ThreadPoolExecutor(COMMIT_THREADS) as pool:
        commits = [pool.submit(commit, s, [], []) for s in footers if footers[s].num_rows == 0]
        todo = [s for s in footers if footers[s].num_rows]
        if todo:
            pieces, counts, seen, failed, rows_seen = defaultdict(list), defaultdict(list), Counter(), 0, 0
            for batch in pieces_dataset(fs, todo, out, options, derive_id, storage_options, lease.run, specials).iter_batches(
                    batch_format="pyarrow", batch_size=None):  # fmt: skip
                for key, piece, piece_counts in zip(*(batch[c].to_pylist() for c in shards.PIECES.names)):
                    pieces[key].append(piece)
                    counts[key].append(piece_counts)
                    seen[key] += piece_counts["rows"]
                    rows_seen += piece_counts["rows"]
                    failed += piece_counts["failed_rows"]
                    if seen[key] == expected[key]:
                        commits.append(pool.submit(commit, by_key[key], pieces.pop(key), counts.pop(key)))
                check_failures(failed, rows_seen, max_failed_fraction, final=False)
            check_failures(failed, rows_seen, max_failed_fraction, final=True)
            short = [f"{s.path} ({seen[k]} of {expected[k]} rows)" for k, s in by_key.items() if seen[k] != expected[k]]
            if short:
                raise InputError(f"Ray Data's read returned other row counts than the Parquet footers give for {', '.join(short)}; "
                                 "a file with fewer rows was not committed, one with more was committed at its footer's "
                                 "count, without the rest. A name Ray Data misreads (a '?' starts a URL "
                                 "query) or a file rewritten during the run does this: rename the file or rerun")  # fmt: skip
        return [c.result() for c in commits]


MIN_ROWS_TO_STOP_EARLY = 1000  # fewer rows than this say little about the failure rate


def check_failures(failed: int, rows: int, max_fraction: float, final: bool) -> None:
    if failed > max_fraction * rows and (final or rows >= MIN_ROWS_TO_STOP_EARLY):
        raise InputError(f"{failed} of {rows} rows failed ({failed / rows:.1%} > --max-failed-fraction {max_fraction}); "
                         "finished shards are committed with each failure in their `error` column: read those to see "
                         "what went wrong, fix the input, and rerun")  # fmt: skip


def pieces_dataset(fs, todo: list[Shard], out: shards.Output, options: Options, derive_id: bool,
                   storage_options: dict | None, run: str, specials: int) -> ray.data.Dataset:  # fmt: skip
    """read_parquet -> Tokenize -> Infer -> write pieces: a dataset of (shard, piece, counts)."""
    columns = read_columns(options, derive_id)
    # partitioning=None: a folder named like `text=foo/` is not a column (the footers' checks saw none).
    ds = ray.data.read_parquet([s.path for s in todo], filesystem=storage.arrow_filesystem(fs), partitioning=None,
                               columns=columns, include_paths=True, include_row_hash=derive_id, num_cpus=0.25)  # fmt: skip
    if derive_id:
        ds = ds.rename_columns({"row_hash": options.id_column})
    ds = build(ds, options).map_batches(
        shards.write_pieces, fn_kwargs=dict(output=out.uri, storage_options=storage_options, run=run, path_column=PATH,
                                            id_column=options.id_column, special_tokens=specials),
        batch_format="pyarrow", batch_size=None, num_cpus=0.25,
    )  # fmt: skip
    # Blocks leave each stage in input order, so shards finish (and commit) one after another
    # rather than all at the end: a killed job loses only the shards in flight.
    ds.context.execution_options.preserve_order = True
    return ds


def output_digest(markers: list[dict]) -> str:
    """sha256 of the commit markers (shard, result file, commit time) a summary covers."""
    committed = sorted((m["key"], m["output"] or "", m["committed_at"]) for m in markers)
    return hashlib.sha256(json.dumps(committed).encode()).hexdigest()


def duplicate_ids(out: shards.Output, markers: list[dict], id_column: str, digest: str, new: list[dict],
                  address: str | None = None) -> int:  # fmt: skip
    """Rows beyond the first with their id, over the whole output of `markers` (within-shard counts
    are in each marker). It reads the id column of every result file (about 8 bytes per row for
    integer ids), so a run that committed nothing `new` takes the count from the last summary
    when that covered the same markers (`output_digest`): a rerun with nothing to do stays fast.
    Up to DRIVER_IDS ids the driver counts them; more, and Ray Data's groupby does, on the cluster."""
    if not new:
        try:
            last = json.loads(out.fs.cat_file(out.join(storage.SUMMARY_FILE)))
            if last["output_digest"] == digest:
                return last["duplicate_ids"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):  # none, damaged, or of an older version
            pass
    files = [out.join(m["output"]) for m in markers if m["output"]]
    if not files:
        return 0
    if sum(m["counts"]["rows"] for m in markers) <= DRIVER_IDS:
        ids = pads.dataset(files, filesystem=out.arrow_fs, format="parquet").to_table(columns=[id_column])[id_column]
        return shards.duplicate_ids(ids)
    init_ray(address, [out.fs])
    groups = ray.data.read_parquet(files, filesystem=out.arrow_fs, columns=[id_column], partitioning=None).groupby(id_column).count()
    return int(groups.map_batches(repeats, batch_format="pyarrow", fn_kwargs={"id_column": id_column}).sum("repeats") or 0)


def repeats(groups: pa.Table, id_column: str) -> pa.Table:
    """Ray Data's groupby(id).count() rows -> one row: the rows beyond the first of each id (the
    null ids form one group there; they are counted apart, as null_ids)."""
    counts = pc.filter(groups["count()"], pc.is_valid(groups[id_column]))
    return pa.table({"repeats": [pc.sum(pc.subtract(counts, 1)).as_py() or 0]})
