"""The tokenizer stage: `Tokenize`, a callable on Arrow tables, and the input checks it shares with
the runner. It imports no torch (`model.tokenizer` wraps the `tokenizers` library), so the CPU
actors that tokenize start fast and stay small. Importing alone, in a fresh interpreter here:
`pipeline.stages` (torch) 2.5 s and 203 MiB of private memory; Ray Data, pyarrow and tokenizers
0.8 s and 94 MiB. A tokenizer actor's peak private memory fell from 270 to 144 MiB (README).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.tokenizer import RobertaTokenizer

TOKENS = "input_ids"  # list<int32> token ids, the only thing that travels from Tokenize to Infer
ADDED_COLUMNS = (TOKENS, "input_tokens", "truncated", "error")  # what Tokenize adds to a batch


class InputError(ValueError):
    """Input data the pipeline cannot process; the message names the column and what to do."""


def is_text(type_: pa.DataType) -> bool:
    """Strings, also dictionary-encoded (pandas' category) or all null (Arrow's null type)."""
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_null(type_)


def text_column(batch: pa.Table, name: str) -> tuple[list[str], list[str | None]]:
    """The column as Python strings, nulls as "" (processed like empty texts and counted as such),
    and per row why it could not be read (None when it could)."""
    if name not in batch.column_names:
        raise InputError(f"column {name!r} not found; available columns: {batch.column_names}")
    column = batch[name]
    if not is_text(column.type):
        raise InputError(
            f"column {name!r} has type {column.type}, expected strings; pass --text-column with the column that holds the text"
        )
    if pa.types.is_dictionary(column.type) or pa.types.is_null(column.type):
        column = column.cast(pa.string())
    column = pc.fill_null(column, "")
    try:
        return column.to_pylist(), [None] * len(column)
    except UnicodeDecodeError:  # Parquet does not validate UTF-8: find the bad rows, keep the rest
        texts, errors = [], []
        for raw in pc.cast(column, pa.binary()).to_pylist():
            try:
                texts.append(raw.decode("utf-8"))
                errors.append(None)
            except UnicodeDecodeError as e:
                texts.append("")
                errors.append(f"column {name!r}: invalid UTF-8 at byte {e.start} ({e.reason}); re-encode this text as UTF-8")
        return texts, errors


class Tokenize:
    """Adds `input_ids` (list<int32>), `input_tokens` (int32), `truncated` (bool) and `error`
    (string, null unless the row failed); drops the text unless `keep_columns` ({input column: output
    name}, `Options.kept`) keeps it, and gives kept columns their output names. A row that fails is
    tokenized as an empty text and carries its error, so one bad row never fails its batch."""

    def __init__(self, model_dir: str, text_column: str = "text", pair_column: str | None = None, max_length: int | None = None,
                 keep_columns: dict[str, str] | None = None):  # fmt: skip
        self.tokenizer = RobertaTokenizer.from_pretrained(model_dir)
        self.text, self.pair = text_column, pair_column
        self.drop = [c for c in (text_column, pair_column) if c and c not in (keep_columns or {})]
        self.rename = {c: name for c, name in (keep_columns or {}).items() if c != name}
        self.max_length = max_length or self.tokenizer.model_max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, errors = text_column(batch, self.text)
        pairs, pair_errors = text_column(batch, self.pair) if self.pair else (None, errors)
        errors = [e or p for e, p in zip(errors, pair_errors)]
        try:
            ids, offsets, truncated = self.tokenizer.encode_batch(texts, pairs, max_length=self.max_length)
        except Exception:  # noqa: BLE001 - find the failing rows one by one; the rest go on
            ids, offsets, truncated = self.encode_rows(texts, pairs, errors)
        batch = batch.drop_columns(self.drop)
        if self.rename:  # after the drop: a kept column may take the name of a text that is not kept
            batch = batch.rename_columns({c: self.rename.get(c, c) for c in batch.column_names})
        batch = batch.append_column(TOKENS, pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids, pa.int32())))
        batch = batch.append_column("input_tokens", pa.array(np.diff(offsets), pa.int32()))
        batch = batch.append_column("truncated", pa.array(truncated, pa.bool_()))
        return batch.append_column("error", pa.array(errors, pa.string()))

    def encode_rows(self, texts, pairs, errors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """encode_batch one row at a time; a failing row becomes an empty text and gets its error."""
        rows = []
        for i, text in enumerate(texts):
            pair = [pairs[i]] if pairs else None
            try:
                rows.append(self.tokenizer.encode_batch([text], pair, max_length=self.max_length))
            except Exception as e:  # noqa: BLE001
                errors[i] = f"tokenizer failed: {type(e).__name__}: {e}"
                rows.append(self.tokenizer.encode_batch([""], [""] if pairs else None, max_length=self.max_length))
        ids = np.concatenate([r[0] for r in rows])
        offsets = np.r_[0, np.cumsum([r[1][-1] for r in rows])]
        return ids, offsets, np.concatenate([r[2] for r in rows])
