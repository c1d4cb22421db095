"""jobs.bench_markers on a few markers, locally and on moto's S3 server: the markers read from
the index are those fetched one by one (the benchmark asserts it each round), and it reports
every figure the README quotes."""

from jobs import bench_markers


def test_the_benchmark_reads_the_same_markers_both_ways_on_both_stores():
    results = bench_markers.main(["--markers", "40", "--s3-markers", "20", "--repeats", "1"])
    for store, n in (("local", 40), ("s3_moto", 20)):
        figures = results[store]
        assert figures["markers"] == n and figures["index_bytes"] > 0
        assert all(figures[k] > 0 for k in ("every_marker_fetched_s", "write_index_s", "from_index_s", "speedup"))
