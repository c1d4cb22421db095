"""The tokenizer stage on plain Arrow tables, no Ray: equal to transformers' tokenizer, clear errors,
a failing row failing alone, and no torch."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import transformers

from pipeline.stages import Infer
from pipeline.tokenize import InputError, Tokenize
from tests.pipeline import reference, table

CHECK = """
import sys
import pyarrow as pa
import ray.data
from pipeline.tokenize import Tokenize
out = Tokenize({model!r})(pa.table({{"id": [1], "text": ["A fine film."]}}))
assert out["input_tokens"][0].as_py() > 2
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""


def test_tokenizer_stage_imports_no_torch(checkpoints):
    """What a tokenizer actor imports, in a fresh interpreter: it tokenizes, and torch never loads."""
    out = subprocess.run([sys.executable, "-c", CHECK.format(model=str(checkpoints["classifier"]))],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_tokenize_matches_reference_and_handles_nulls(checkpoints, texts):
    directory = checkpoints["classifier"]
    ref = transformers.AutoTokenizer.from_pretrained(directory)
    out = Tokenize(str(directory))(table(texts + [None]))
    assert out["input_ids"].type == pa.list_(pa.int32())
    expected = ref(texts + [""], truncation=True, max_length=reference.MAX_TOKENS)["input_ids"]
    assert out["input_ids"].to_pylist() == expected
    assert out["input_tokens"].to_pylist() == [len(e) for e in expected]
    assert out["truncated"].to_pylist()[0] == (len(ref(texts[0])["input_ids"]) > reference.MAX_TOKENS)
    assert "text" not in out.column_names and out["id"].to_pylist() == list(range(len(texts) + 1))


def test_tokenize_errors_name_the_column(checkpoints):
    tokenize = Tokenize(str(checkpoints["classifier"]))
    with pytest.raises(InputError, match=r"column 'text' not found; available columns: \['id', 'body'\]"):
        tokenize(pa.table({"id": [1], "body": ["x"]}))
    with pytest.raises(InputError, match="column 'text' has type int64, expected strings"):
        tokenize(pa.table({"id": [1], "text": [3]}))


def test_invalid_utf8_in_the_pair_column_fails_its_row_alone(checkpoints):
    hypothesis = pa.array([b"It was fine.", b"bad \xff byte", b"Great."], pa.binary()).view(pa.string())
    tokenize = Tokenize(str(checkpoints["classifier"]), pair_column="hypothesis")
    out = tokenize(pa.table({"id": [0, 1, 2], "text": ["A film.", "Another.", "More."], "hypothesis": hypothesis}))
    errors = out["error"].to_pylist()
    assert errors[1].startswith("column 'hypothesis': invalid UTF-8 at byte 4") and errors[0] is errors[2] is None
    ref = transformers.AutoTokenizer.from_pretrained(checkpoints["classifier"])
    assert out["input_ids"].take([0, 2]).to_pylist() == ref(["A film.", "More."], ["It was fine.", "Great."])["input_ids"]


def test_dictionary_and_all_null_text_columns_are_text(checkpoints, texts):
    """pandas' category dtype arrives dictionary-encoded, a column of only None as Arrow's null type."""
    tokenize = Tokenize(str(checkpoints["classifier"]), keep_columns={"text": "text"})
    plain = tokenize(table(texts[:3] + [None]))
    encoded = tokenize(pa.table({"id": range(4), "text": pa.array(texts[:3] + [None]).dictionary_encode()}))
    assert encoded["input_ids"].equals(plain["input_ids"])
    nulls = tokenize(pa.table({"id": [1, 2], "text": pa.nulls(2)}))
    assert nulls["input_ids"].to_pylist() == tokenize(table(["", ""]))["input_ids"].to_pylist()
    assert plain["text"].to_pylist() == texts[:3] + [None]  # kept when keep_columns lists it


def test_a_row_the_tokenizer_cannot_take_fails_alone(checkpoints, monkeypatch):
    tokenize = Tokenize(str(checkpoints["classifier"]))
    encode = tokenize.tokenizer.encode_batch

    def fragile(texts, pairs=None, max_length=None):
        if any("boom" in t for t in texts):
            raise RuntimeError("cannot encode boom")
        return encode(texts, pairs, max_length=max_length)

    monkeypatch.setattr(tokenize.tokenizer, "encode_batch", fragile)
    out = Infer(str(checkpoints["classifier"]), "classify", device="cpu")(tokenize(table(["good one", "boom", "fine"])))
    assert out["error"].to_pylist() == [None, "tokenizer failed: RuntimeError: cannot encode boom", None]
    assert out["label"].to_pylist()[1] is None and None not in out["label"].to_pylist()[::2]
    logits = reference.classify(checkpoints["classifier"], ["good one", "fine"])
    np.testing.assert_allclose(np.stack(out["probs"].to_numpy(zero_copy_only=False)[::2]),
                               np.exp(logits) / np.exp(logits).sum(1, keepdims=True), atol=1e-4)  # fmt: skip
