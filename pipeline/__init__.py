"""Ray Data batch inference for the RoBERTa family.

Python API for ad-hoc data: each task function takes a `ray.data.Dataset`, Parquet path(s), a
pandas DataFrame or a pyarrow Table, and returns a lazy `ray.data.Dataset` with the id column,
the kept columns and the task's output columns, so calls chain with the rest of Ray Data:

    import pipeline
    ds = pipeline.classify(df, model="ckpt/", text_column="review", keep_columns=["source"])
    ds.write_parquet("labels/")

`pipeline.run(...)` is the whole job the CLI and `jobs/` run: Parquet in, Parquet out, a summary back.
"""

import lazy_loader

# Each name loads its module on first use (lazy_loader, PEP 562): so `import pipeline.tokenize`
# (the tokenizer actors) imports neither torch nor the runner.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "api": ["classify", "embed", "fill_mask", "score"],
        "runner": ["JobInterrupted", "Options", "Summary", "run"],
        "tasks": ["TaskError", "TaskOptions"],
        "tokenize": ["InputError"],
    },
)
