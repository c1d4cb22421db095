"""The Python API's task functions (see the package docstring): each builds a lazy Ray Dataset."""

from __future__ import annotations

import os

import pyarrow as pa
import ray

from pipeline import storage
from pipeline.runner import DEFAULT_ID, Options, build, check_job, check_schema, init_ray, job_columns
from pipeline.tasks import TaskError, TaskOptions
from pipeline.tokenize import InputError


PATHS = (str, os.PathLike, list, tuple)


def as_dataset(data, storage_options: dict | None = None) -> ray.data.Dataset:
    """Parquet paths are listed as a job lists them (`storage.parquet_files`: absolute local paths)
    and read with Ray Data's `row_hash` (file path and row position), the id a job derives for
    input without one: the API's ids then equal a job's over the same files, however the path is spelled.
    storage_options: fsspec's, for s3:// paths (as --storage-options)."""
    if isinstance(data, PATHS):
        paths = [os.fspath(p) for p in data] if isinstance(data, (list, tuple)) else os.fspath(data)
        fs, files = storage.parquet_files(paths, storage_options)
        init_ray(filesystems=[fs])  # an embedded Ray's workers then import s3fs first (pipeline/workers.py)
        return ray.data.read_parquet([f.path for f in files], filesystem=storage.arrow_filesystem(fs), include_row_hash=True,
                                     partitioning=None)  # as jobs read: `x=y/` is no column  # fmt: skip
    init_ray()
    if isinstance(data, ray.data.Dataset):
        return data
    if isinstance(data, pa.Table):
        return ray.data.from_arrow(data)
    if hasattr(data, "to_parquet"):  # pandas DataFrame, without importing pandas here
        return ray.data.from_arrow(pa.Table.from_pandas(data, preserve_index=False))
    raise TypeError(f"expected a ray.data.Dataset, Parquet path(s), pandas DataFrame or pyarrow Table, not {type(data).__name__}")


def apply(task: str, data, model: str, text_column: str = "text", id_column: str = DEFAULT_ID,
          keep_columns=(), storage_options: dict | None = None, **settings) -> ray.data.Dataset:  # fmt: skip
    """Run `task` over `data` lazily. settings: the fields of `Options` and of `TaskOptions`.
    keep_columns: a name, names, or {input column: output name} (as the CLI's `label:gold_label`)."""
    task_fields = TaskOptions.__dataclass_fields__
    task_options = TaskOptions(**{k: v for k, v in settings.items() if k in task_fields})
    if isinstance(keep_columns, dict):  # as the CLI spells it: "input:output"
        if any(":" in c for c in keep_columns):
            raise TaskError(f"keep_columns {keep_columns}: a column whose name holds ':' cannot be kept; rename it first")
        keep_columns = [f"{c}:{name}" for c, name in keep_columns.items()]
    options = Options(task=task, model=str(model), text_column=text_column, id_column=id_column,
                      keep_columns=(keep_columns,) if isinstance(keep_columns, str) else tuple(keep_columns), task_options=task_options,
                      **{k: v for k, v in settings.items() if k not in task_fields})  # fmt: skip
    job_task, _ = check_job(options)
    ds = as_dataset(data, storage_options)
    schema = ds.schema().base_schema
    if not isinstance(schema, pa.Schema):  # a dataset of pandas blocks: look at one row as Arrow
        schema = ds.take_batch(1, batch_format="pyarrow").schema
    derive_id = check_schema(schema, options, job_task, "dataset")
    if derive_id:  # from the file path and row position that only Parquet paths have (`as_dataset`)
        if not isinstance(data, PATHS):
            raise InputError(f"dataset: no id column {id_column!r}; available columns: {ds.schema().names}. Add one or pass id_column=")
        ds = ds.rename_columns({"row_hash": id_column})
    return build(ds.select_columns(job_columns(options)), options)


def classify(data, model, **kwargs) -> ray.data.Dataset:
    """Columns label, label_id, score, probs (or labels / score for multi-label / regression)."""
    return apply("classify", data, model, **kwargs)


def embed(data, model, **kwargs) -> ray.data.Dataset:
    """Column embedding (fixed-size list of float32, or float16 with embedding_dtype="float16")."""
    return apply("embed", data, model, **kwargs)


def fill_mask(data, model, **kwargs) -> ray.data.Dataset:
    """Column predictions: per <mask>, the top-k tokens with ids and probabilities."""
    return apply("fill-mask", data, model, **kwargs)


def score(data, model, **kwargs) -> ray.data.Dataset:
    """Columns log_likelihood, num_tokens, perplexity."""
    return apply("score", data, model, **kwargs)
