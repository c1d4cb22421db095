"""jobs/benchmark.py on a few rows, without the end-to-end CLI runs: every run sees the same rows,
rayberta agrees with transformers, and the figures the README quotes are computed. No timing is
asserted (that is the benchmark's own output, not a test's)."""

import shutil

import pytest

from jobs import benchmark


@pytest.fixture
def workdir(tmp_path, bpe_dir):
    (tmp_path / "bpe").mkdir()
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "bpe" / "tokenizer.json")  # skips training a BPE on the corpus
    return tmp_path


@pytest.mark.parametrize("task, quality", [("classify", "label_agreement"), ("score-pseudo", "within_bound")])
def test_runs_side_by_side_on_the_same_rows(workdir, task, quality):
    results = benchmark.main(task, "small", rows=12, dtype="float32", max_length=48, batch_tokens=None,
                             workdir=workdir, skip_e2e=True, scale=1)  # fmt: skip
    usual, stage = results["transformers_usual"], results["rayberta_model_stage"]
    assert stage["tokens"] == usual["tokens"] and stage["x_usual"] > 0
    assert stage["quality"][quality] == 1  # all labels agree / within the bound (True)
    assert 0 <= stage["padding"] < 1
    if task != "score-pseudo":  # that baseline runs one text per forward: no padding to beat
        assert stage["padding"] <= usual["padding"]
    assert 0 < stage["fraction_of_limit"] and results["limit"]["tokens_per_s"] > 0
    assert results["batch_tokens"] == stage["batch_tokens"] > 0
