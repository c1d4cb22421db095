"""How long a run takes to read an output's commit markers, with and without their index.

    python -m jobs.bench_markers [--markers 20000] [--s3-markers 5000] [--repeats 3]

Every run starts by reading every commit marker of its output (pipeline/shards.py). Without the
index that is one GET per marker, as every run did before 2026-11-27; with it, one GET of
_manifest/_index.arrow plus a fetch of only the markers changed since. This writes N markers
(as a real classify run writes them) into a local folder and, with moto installed (the test
extra), into moto's S3 server started on loopback in its own process, then times side by side,
`--repeats` rounds each, medians: `Output.markers()` fetching every marker (the index deleted),
`Output.write_index`, and `Output.markers()` from the index. Either way the markers are listed.
moto answers slower than S3 itself and on the same 2 cores, so its times are for the ratio.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from pipeline import shards


def marker(i: int) -> dict:
    """A commit marker as a classify run writes it."""
    key = shards.shard_key(f"/data/in/part-{i:06d}.parquet")
    settings = {"task": "classify", "text_column": "text", "pair_column": None, "id_column": "id", "keep_columns": [],
                "max_length": None, "dtype": "float32",
                "task_options": {"threshold": 0.5, "logits": False, "pooling": "mean", "normalize": False,
                                 "embedding_dtype": "float32", "top_k": 5, "stride": None}}  # fmt: skip
    return {"model": "a4728cc724d6aab8e05d47532192783096b8f1be033196224ae31930c776f64f", "settings": settings,
            "run": "b5182e80fd89", "derived_id": False, "key": key, "input": f"/data/in/part-{i:06d}.parquet",
            "size": 1_361_000 + i, "version": f"{1795769426.5 + i}", "output": f"part-{i:06d}-{key}.parquet",
            "counts": {"rows": 10_000, "tokens": 2_400_000 + i, "truncated_rows": 7, "empty_texts": 0, "failed_rows": 0,
                       "null_ids": 0, "duplicate_ids": 0}, "committed_at": 1795769543.85 + i}  # fmt: skip


def measure(out: shards.Output, n: int, repeats: int) -> dict:
    out.make_parent(out.join(shards.MANIFEST, "x"))
    out.fs.pipe({out.join(shards.MANIFEST, f"{m['key']}.json"): json.dumps(m, indent=1).encode() for m in map(marker, range(n))})
    index = out.join(shards.MANIFEST, shards.INDEX)
    rounds: dict[str, list[float]] = {"every_marker_fetched_s": [], "write_index_s": [], "from_index_s": []}
    for _ in range(repeats):
        out.remove(index)
        start = time.perf_counter()
        markers, fetched = out.markers()
        rounds["every_marker_fetched_s"].append(time.perf_counter() - start)
        assert (len(markers), fetched) == (n, n)
        start = time.perf_counter()
        out.write_index(markers)
        rounds["write_index_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        indexed, fetched = out.markers()
        rounds["from_index_s"].append(time.perf_counter() - start)
        assert indexed == markers and fetched == 0
    result = {"markers": n, **{k: round(statistics.median(v), 3) for k, v in rounds.items()}}
    result["index_bytes"] = out.fs.size(index)
    result["speedup"] = round(result["every_marker_fetched_s"] / result["from_index_s"], 1)
    return result


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto's S3 server did not start")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markers", type=int, default=20_000, help="markers in the local folder")
    parser.add_argument("--s3-markers", type=int, default=5_000, help="markers on moto's S3 (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        results["local"] = measure(shards.Output(f"{folder}/out"), args.markers, args.repeats)
        print("local", results["local"], file=sys.stderr)
    if args.s3_markers:
        server, endpoint = moto_server()
        try:
            # Not us-east-1: s3fs sends the region as the bucket's LocationConstraint, which refuses that one.
            options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench", "client_kwargs": {"region_name": "eu-west-1"}}
            out = shards.Output("s3://bench/out", options)
            out.fs.mkdir("bench")
            results["s3_moto"] = measure(out, args.s3_markers, args.repeats)
            print("s3_moto", results["s3_moto"], file=sys.stderr)
        finally:
            server.kill()
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
