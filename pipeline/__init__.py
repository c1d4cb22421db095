"""Ray Data batch inference for the RoBERTa family.

Python API for ad-hoc data: each task function takes a `ray.data.Dataset`, Parquet path(s), a
pandas DataFrame or a pyarrow Table, and returns a lazy `ray.data.Dataset` with the id column,
the kept columns and the task's output columns, so calls chain with the rest of Ray Data:

    import pipeline
    ds = pipeline.classify(df, model="ckpt/", text_column="review", keep_columns=["source"])
    ds.write_parquet("labels/")

`pipeline.run(...)` is the whole job the CLI and `jobs/` run: Parquet in, Parquet out, a summary back.
"""

import importlib

# Names the package exports -> the module defining each, imported on first access (PEP 562): so
# `import pipeline.tokenize` (the tokenizer actors) imports neither torch nor the runner.
_EXPORTS = {
    "classify": "pipeline.api",
    "embed": "pipeline.api",
    "fill_mask": "pipeline.api",
    "score": "pipeline.api",
    "InputError": "pipeline.tokenize",
    "JobInterrupted": "pipeline.runner",
    "Options": "pipeline.runner",
    "Summary": "pipeline.runner",
    "run": "pipeline.runner",
    "TaskError": "pipeline.tasks",
    "TaskOptions": "pipeline.tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
