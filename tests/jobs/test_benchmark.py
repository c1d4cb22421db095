"""jobs/benchmark.py on a few rows, without the end-to-end CLI runs: every run sees the same rows,
rayberta agrees with transformers, and the figures the README quotes are computed; the limit's
FLOPs/token formula against torch's FLOP counter. No timing is asserted (that is the benchmark's
own output, not a test's)."""

import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from jobs import benchmark
from jobs.bench_tasks import BENCHES
from pipeline.tasks import make_task


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


@pytest.mark.parametrize("task, head", [("classify", "classifier"), ("embed", "base"), ("score-causal", "causal_lm"),
                                        ("score-pseudo", "masked_lm")])  # fmt: skip
def test_flops_per_token_counts_what_the_task_computes(checkpoints, task, head):
    """The limit's formula (module docstring) against torch's FLOP counter over the task's run, on
    rows of one length (no padding): every matmul of encoder and head, attention included."""
    bench = BENCHES[task]
    runner = make_task(bench.task, str(checkpoints[head]), bench.options)
    model = runner.load("float32", torch.device("cpu"))
    B, T = 3, 12
    ids = torch.randint(10, 300, (B, T))
    ids[:, 0], ids[:, -1] = model.config.bos_token_id, model.config.eos_token_id
    # torch's table lacks the CPU attention kernel: counted as its other attention kernels are
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter, torch.inference_mode():
        runner.run(model, ids, torch.ones_like(ids), budget=10**6)
    assert counter.get_total_flops() == pytest.approx(benchmark.flops_per_token(bench, model.config, np.full(B, T)) * B * T)


def test_model_stage_process_starts_with_the_environment_given():
    # The allocator and oneDNN read their variables at a process's start: the model stage's process
    # must get them at its start, and the benchmark's own environment must stay as it was.
    result = benchmark.in_fresh_process({"RAYBERTA_TEST_VARIABLE": "42"}, report_variable, "RAYBERTA_TEST_VARIABLE")
    assert result["value"] == "42" and "RAYBERTA_TEST_VARIABLE" not in os.environ
    assert result["peak_rss_mib"] >= result["peak_private_mib"] > 0


def report_variable(name):  # a module-level function: the spawned process imports it by name
    return {"value": os.environ.get(name)}


def test_cpu_seconds_count_for_a_workers_task_kind_not_its_idle_or_exit_titles():
    titles = iter(["ray system", "ray::IDLE", "ray::MapWorker(MapBatches(Infer))", "ray system", "ray system"])
    with benchmark.ProcessStats(lambda: {os.getpid(): next(titles)}, interval=3600) as stats:
        for _ in range(3):
            sum(range(10**6))  # some CPU between samples
            stats.sample()
    assert set(stats.cpu_s) == {"ray::MapWorker(MapBatches(Infer))", "total"}
    assert stats.cpu_s["total"] == stats.cpu_s["ray::MapWorker(MapBatches(Infer))"] >= 0
