"""jobs/benchmark.py on a few rows, without the end-to-end CLI runs: every run sees the same rows,
rayberta agrees with transformers, and the figures the README quotes are computed; the limit's
FLOPs/token formula against torch's FLOP counter. No timing is asserted (that is the benchmark's
own output, not a test's)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from jobs import benchmark
from jobs.bench_tasks import BENCHES, corpus
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


def test_repeated_rounds_report_each_runs_median_round(workdir):
    """Also --compare-layers: on a CPU the model stage runs a second time skipping the pads."""
    results = benchmark.main("classify", "small", rows=6, dtype="float32", max_length=32, batch_tokens=None,
                             workdir=workdir, skip_e2e=True, scale=1, repeats=2, compare_layers=True)  # fmt: skip
    assert results["repeats"] == 2
    stages = ("rayberta_model_stage", "rayberta_model_stage_unpadded_layers")
    for name in ("transformers_usual", "transformers_sorted", *stages):
        rounds = results[name]["tokens_per_s_rounds"]
        assert len(rounds) == 2 and results[name]["tokens_per_s"] == pytest.approx(min(rounds), rel=1e-3)  # the slower middle one
    for name in stages:
        assert results[name]["quality"]["label_agreement"] == 1
        assert results[name]["tokens"] == results["transformers_usual"]["tokens"]
    assert results["rayberta_model_stage_unpadded_layers"]["padding"] == 0


def test_the_cli_runs_it(workdir, capsys):
    """`rayberta benchmark` is `python -m jobs.benchmark`: the same flags, results printed and written."""
    from jobs.cli import main

    flags = ["--task", "classify", "--rows", "6", "--max-length", "32", "--skip-e2e", "--workdir", str(workdir),
             "--json", str(workdir / "results.json")]  # fmt: skip
    assert main(["benchmark", *flags]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((workdir / "results.json").read_text())
    assert (printed["task"], printed["rows"]) == ("classify", 6) and printed["rayberta_model_stage"]["tokens_per_s"] > 0


def test_embed_quality_labels_rows_with_a_sentiment_probe_fit_on_the_reference():
    labels = np.array(corpus(40, column="label"))
    reference = np.random.default_rng(0).normal(size=(40, 8)) + 2.0 * labels[:, None]  # one cluster per label
    assert BENCHES["embed"].quality(reference.copy(), reference)["probe_label_agreement"] == 1
    moved = reference.copy()
    moved[0] = reference[labels != labels[0]].mean(0)  # onto the other label's centroid
    quality = BENCHES["embed"].quality(moved, reference)
    assert quality["probe_label_agreement"] == 39 / 40 and quality["min_cosine"] < 0.999


def test_median_run_of_an_odd_count_is_the_middle_one():
    rounds = [{"tokens_per_s": rate, "wall_s": 1 / rate} for rate in (3.0, 1.0, 2.0)]
    assert benchmark.median_run(rounds) == {"tokens_per_s": 2.0, "wall_s": 0.5, "tokens_per_s_rounds": [3.0, 1.0, 2.0]}


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
        runner.run(model, ids, torch.ones_like(ids), np.full(B, T), budget=10**6)
    assert counter.get_total_flops() == pytest.approx(benchmark.flops_per_token(bench, model.config, np.full(B, T)) * B * T)


def test_model_stage_process_starts_with_the_environment_given(monkeypatch):
    # The allocator and oneDNN read their variables at a process's start: the model stage's process
    # must get them at its start, and the benchmark's own environment must stay as it was.
    monkeypatch.setenv("RAYBERTA_TEST_KEPT", "before")
    env = {"RAYBERTA_TEST_NEW": "42", "RAYBERTA_TEST_KEPT": "during"}
    result = benchmark.in_fresh_process(env, report_variables, list(env))
    assert result["values"] == env
    assert "RAYBERTA_TEST_NEW" not in os.environ and os.environ["RAYBERTA_TEST_KEPT"] == "before"
    assert result["peak_rss_mib"] >= result["peak_private_mib"] > 0


def report_variables(names):  # module-level functions: the spawned process imports them by name
    return {"values": {name: os.environ.get(name) for name in names}}


def fail(code):
    if code:
        os._exit(code)  # dies without a word
    raise ValueError("the model stage failed")


@pytest.mark.parametrize("code, message", [(0, "ValueError: the model stage failed"), (3, "exit code 3")])
def test_a_failing_model_stage_process_is_an_error_not_a_hang(code, message):
    with pytest.raises(RuntimeError, match=message):
        benchmark.in_fresh_process({}, fail, code)


def burn():
    return sum(range(2 * 10**7))  # a fixed amount of CPU work: ~0.3 s here, so it rounds above 0 on faster hosts too


def test_cpu_seconds_go_to_the_kind_a_process_has_and_an_exiting_workers_to_its_task():
    titles = iter(["ray system", "ray::IDLE", "ray::MapWorker(MapBatches(Infer))", "ray system", "ray system"])
    before = benchmark.cpu_seconds(os.getpid())
    with benchmark.ProcessStats(lambda: {os.getpid(): next(titles)}, interval=3600) as stats:  # sample 1
        for _ in range(3):  # samples 2 (idle), 3 (a task), 4 (exiting: the title falls back to none)
            burn()
            stats.sample()
        burn()
    # sample 5, exiting. Counted from the process's start: all before sample 1 is `ray system`'s.
    assert stats.cpu_s["ray system"] == pytest.approx(before, abs=0.2)
    assert stats.cpu_s["ray::MapWorker(MapBatches(Infer))"] > stats.cpu_s["ray::IDLE"] > 0  # three burns, one
    assert set(stats.cpu_s) == {"ray system", "ray::IDLE", "ray::MapWorker(MapBatches(Infer))", "total"}
