"""The inference stage on plain Arrow tables, no Ray: packing, and every task against transformers,
whatever the micro-batch composition or row order, with padded and with unpadded layers (`layers`)."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import transformers

from model import RobertaConfig
from model.cpu_fusion import FusedLinear, onednn_runs
from pipeline.stages import CPU_ACTIVATION_LIMIT, Infer, micro_batches, pad, token_budget
from pipeline.tasks import TaskError, TaskOptions, make_task
from pipeline.tokenize import Tokenize
from tests.pipeline import reference, table

ATOL = 1e-4


def run_infer(model_dir, task, texts, budget=None, shuffle_seed=None, pairs=None, **task_options):
    """Tokenize + Infer on a plain table, optionally in shuffled row order; results sorted back by id."""
    batch = table(texts, **({"hypothesis": pa.array(pairs, pa.string())} if pairs else {}))
    if shuffle_seed is not None:
        batch = batch.take(np.random.default_rng(shuffle_seed).permutation(batch.num_rows))
    tokens = Tokenize(str(model_dir), pair_column="hypothesis" if pairs else None)(batch)
    out = Infer(str(model_dir), task, TaskOptions(**task_options), batch_tokens=budget, device="cpu")(tokens)
    return out.take(np.argsort(out["id"].to_numpy()))


def test_micro_batches_cover_every_row_once_within_budget():
    lengths = np.random.default_rng(0).integers(3, 200, size=500)
    groups = micro_batches(lengths, budget=1024)
    assert sorted(np.concatenate(groups).tolist()) == list(range(500))
    for g in groups:
        assert len(g) == 1 or len(g) * lengths[g].max() <= 1024
    # sorted by length: padding is small
    padded = sum(len(g) * lengths[g].max() for g in groups)
    assert padded / lengths.sum() < 1.1


def test_pad_gathers_rows_of_a_flat_list_column():
    values = np.arange(10, dtype=np.int32)
    offsets = np.array([0, 3, 4, 10])
    ids, mask = pad(values, offsets, np.array([2, 0]), pad_id=-1)
    assert ids.tolist() == [[4, 5, 6, 7, 8, 9], [0, 1, 2, -1, -1, -1]]
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]


@pytest.mark.parametrize("budget, seed", [(None, None), (300, 1), (64, 2)])
def test_classify_equals_transformers_for_any_batching(checkpoints, texts, budget, seed, layers):
    out = run_infer(checkpoints["classifier"], "classify", texts, budget, seed, logits=True)
    logits = reference.classify(checkpoints["classifier"], texts)
    np.testing.assert_allclose(np.stack(out["logits"].to_numpy(zero_copy_only=False)), logits, atol=ATOL)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(np.stack(out["probs"].to_numpy(zero_copy_only=False)), probs, atol=ATOL)
    labels = ["negative", "neutral", "positive"]
    assert out["label"].to_pylist() == [labels[i] for i in probs.argmax(1)]
    assert out["label_id"].to_pylist() == probs.argmax(1).tolist()
    np.testing.assert_allclose(out["score"].to_numpy(), probs.max(1), atol=ATOL)
    assert out.schema.field("probs").type == pa.list_(pa.float32(), 3)


@pytest.mark.skipif(not onednn_runs(torch.float32), reason="this torch build has no oneDNN: Infer keeps nn.Linear")
def test_cpu_inference_runs_the_fused_linear_layers(checkpoints):
    """The transformers comparisons in this file run through model/cpu_fusion.py on the CPU."""
    model = Infer(str(checkpoints["classifier"]), "classify", device="cpu").model
    block = model.roberta.layers[0]
    assert isinstance(block.mlp_up, FusedLinear) and block.mlp_up.activation == model.config.hidden_act
    assert isinstance(block.attention.query, FusedLinear)


def test_cpu_budget_keeps_the_largest_activation_at_fp32_size_within_the_limit():
    config = RobertaConfig(hidden_size=768, intermediate_size=3072)
    budget = token_budget(config, torch.float32, torch.device("cpu"))
    mlp_bytes = config.intermediate_size * 4  # one token's (intermediate,) activation in fp32
    assert budget & (budget - 1) == 0  # a power of two
    assert budget * mlp_bytes <= CPU_ACTIVATION_LIMIT < 2 * budget * mlp_bytes
    assert token_budget(config, torch.bfloat16, torch.device("cpu")) == budget  # measured best in bf16 too


def test_out_of_memory_halves_the_budget_and_loses_no_row(checkpoints, texts, monkeypatch):
    """A micro-batch over 256 padded tokens raises CUDA's out-of-memory error (there is no GPU
    here; a real one is in tests/pipeline/test_gpu.py): its rows run again in halves."""
    tokens = Tokenize(str(checkpoints["classifier"]))(table(texts))
    infer = Infer(str(checkpoints["classifier"]), "classify", TaskOptions(logits=True), batch_tokens=2048, device="cpu")
    run, sizes = infer.task.run, []

    def small_memory(model, ids, mask, lengths, budget):
        if ids.numel() > 256:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        sizes.append(ids.numel())
        return run(model, ids, mask, lengths, budget)

    monkeypatch.setattr(infer.task, "run", small_memory)
    out = infer(tokens)
    assert infer.budget == 256 and max(sizes) <= 256
    np.testing.assert_allclose(np.stack(out["logits"].to_numpy(zero_copy_only=False)),
                               reference.classify(checkpoints["classifier"], texts), atol=ATOL)  # fmt: skip


def test_a_config_asking_for_attention_maps_changes_no_task(checkpoints, texts, tmp_path):
    """config.json's output_attentions/output_hidden_states set the model's forward defaults (as in
    transformers); the tasks ask for neither, and maps would not combine with `lengths`."""
    import shutil

    directory = shutil.copytree(checkpoints["masked_lm"], tmp_path / "mlm")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "output_attentions": True, "output_hidden_states": True}))
    tokens = Tokenize(str(directory))(table(texts[:4]))
    for task in ("embed", "fill-mask", "score"):
        expected = Infer(str(checkpoints["masked_lm"]), task, device="cpu")(tokens)
        assert Infer(str(directory), task, device="cpu")(tokens).equals(expected), task


def test_a_row_whose_output_is_not_finite_fails_alone(checkpoints, texts, monkeypatch):
    """A NaN (an fp16 overflow, say) would still give an argmax label: the row fails instead."""
    tokens = Tokenize(str(checkpoints["classifier"]))(table(texts))
    infer = Infer(str(checkpoints["classifier"]), "classify", TaskOptions(logits=True), device="cpu")
    run, bad = infer.task.run, 3
    target = torch.tensor(tokens["input_ids"][bad].as_py())

    def overflowing(model, ids, mask, lengths, budget):
        outputs = run(model, ids, mask, lengths, budget)
        hit = torch.from_numpy(lengths == len(target)) & (ids[:, : len(target)] == target).all(1)  # row `bad`
        outputs["logits"][hit, 0] = float("nan")
        return outputs

    monkeypatch.setattr(infer.task, "run", overflowing)
    out = infer(tokens)
    errors = out["error"].to_pylist()
    assert errors[bad].startswith("the model's output is not finite") and errors.count(None) == len(texts) - 1
    assert out["label"][bad].as_py() is None and out["logits"][bad].as_py() is None
    assert out.column_names[:4] == [c for c in tokens.column_names if c != "input_ids"]  # every block: one column order
    expected = reference.classify(checkpoints["classifier"], texts)
    kept = [i for i in range(len(texts)) if i != bad]
    np.testing.assert_allclose(np.stack(out["logits"].to_numpy(zero_copy_only=False)[kept]), expected[kept], atol=ATOL)


def test_a_float16_embedding_that_overflows_fails_its_row(checkpoints, texts):
    """The check runs on the stored dtype: an embedding over float16's 65,504 is inf there."""
    tokens = Tokenize(str(checkpoints["masked_lm"]))(table(texts[:4]))
    infer = Infer(str(checkpoints["masked_lm"]), "embed", TaskOptions(embedding_dtype="float16"), device="cpu")
    assert infer(tokens)["error"].null_count == 4
    infer.model.layers[-1].mlp_norm.weight.data.fill_(1e6)  # every pooled value now far beyond float16
    out = infer(tokens)
    assert all(e.startswith("the model's output is not finite") for e in out["error"].to_pylist())
    assert out["embedding"].null_count == 4


def test_a_fill_mask_row_whose_probabilities_are_nan_fails_alone(checkpoints, texts, monkeypatch):
    tokens = Tokenize(str(checkpoints["masked_lm"]))(table(["a <mask> b", "c <mask> d <mask>", "no mask"]))
    infer = Infer(str(checkpoints["masked_lm"]), "fill-mask", device="cpu")
    logits = infer.model.logits

    def nan_at_the_last_mask(hidden, at):
        out = logits(hidden, at)  # (N masks, V), rows in order: the second row's second mask is last
        out[-1] = float("nan")
        return out

    monkeypatch.setattr(infer.model, "logits", nan_at_the_last_mask)
    out = infer(tokens)
    assert [e is None for e in out["error"].to_pylist()] == [True, False, True]
    assert out["predictions"].to_pylist()[1] is None and len(out["predictions"][0]) == 1


@pytest.mark.parametrize("failures", [1, 2])
def test_out_of_memory_on_one_row_is_retried_once_then_named(checkpoints, monkeypatch, failures):
    """One row that classify cannot cut smaller: run once more as it was (the first failure may be
    fragmentation), then an error naming the row's length and what to do; never halved down to
    the minimum budget."""
    tokens = Tokenize(str(checkpoints["classifier"]))(table(["a review that may not fit"]))
    infer = Infer(str(checkpoints["classifier"]), "classify", TaskOptions(logits=True), batch_tokens=2048, device="cpu")
    run, calls = infer.task.run, []

    def short_of_memory(model, ids, mask, lengths, budget):
        calls.append(ids.shape)
        if len(calls) <= failures:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return run(model, ids, mask, lengths, budget)

    monkeypatch.setattr(infer.task, "run", short_of_memory)
    if failures == 2:
        with pytest.raises(torch.OutOfMemoryError, match=r"one row of \d+ tokens does not fit .* lower --max-length"):
            infer(tokens)
    else:
        out = infer(tokens)
        np.testing.assert_allclose(np.stack(out["logits"].to_numpy(zero_copy_only=False)),
                                   reference.classify(checkpoints["classifier"], ["a review that may not fit"]), atol=ATOL)  # fmt: skip
    assert len(calls) == 2 and infer.budget == 2048


def test_bfloat16_keeps_labels_and_logits_near_transformers(checkpoints, reviews):
    """bfloat16 on CPU against transformers in float32 on 200 real reviews: logits within 3% of the
    largest reference logit (measured: 1.1%), and the same label wherever the reference's top two
    logits are further apart than twice that (a random classifier has near-ties, which bf16 kernels
    of other CPUs may round either way)."""
    texts = reviews[:200]
    tokens = Tokenize(str(checkpoints["classifier"]))(table(texts))
    out = Infer(str(checkpoints["classifier"]), "classify", TaskOptions(logits=True), dtype="bfloat16", device="cpu")(tokens)
    got, expected = np.stack(out["logits"].to_numpy(zero_copy_only=False)), reference.classify(checkpoints["classifier"], texts)
    tolerance = 0.03 * np.abs(expected).max()
    assert np.abs(got - expected).max() <= tolerance
    top2 = np.sort(expected, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
    assert clear.mean() > 0.5 and (got.argmax(1) == expected.argmax(1))[clear].all()


def test_classify_text_pairs(checkpoints, texts):
    """NLI / cross-encoder input: both texts in one sequence, longest_first truncation as the reference."""
    pairs = ["It was great.", "", "A long hypothesis " * 30] * 6
    out = run_infer(checkpoints["classifier"], "classify", texts, budget=256, shuffle_seed=7, pairs=pairs[: len(texts)], logits=True)
    expected = reference.classify(checkpoints["classifier"], texts, pairs[: len(texts)])
    np.testing.assert_allclose(np.stack(out["logits"].to_numpy(zero_copy_only=False)), expected, atol=ATOL)


def test_classify_multi_label_and_regression(checkpoints, texts):
    out = run_infer(checkpoints["multi_label"], "classify", texts, threshold=0.4)
    probs = 1 / (1 + np.exp(-reference.classify(checkpoints["multi_label"], texts)))
    names = np.array(["negative", "neutral", "positive"])
    assert out["labels"].to_pylist() == [names[p >= 0.4].tolist() for p in probs]
    out = run_infer(checkpoints["regression"], "classify", texts, budget=200)
    np.testing.assert_allclose(out["score"].to_numpy(), reference.classify(checkpoints["regression"], texts)[:, 0], atol=ATOL)
    assert "label" not in out.column_names


def test_classify_kind_follows_an_explicit_problem_type(bpe_dir, texts, tmp_path):
    """config.json's problem_type wins over the number of outputs, as in the loss: one sigmoid
    output is a binary multi-label classifier, and a regression may have several outputs."""
    from tests.checkpoints import checkpoint

    binary = checkpoint(tmp_path / "binary", bpe_dir, "RobertaForSequenceClassification", num_labels=1,
                        problem_type="multi_label_classification", id2label={0: "toxic"})  # fmt: skip
    probs = 1 / (1 + np.exp(-reference.classify(binary, texts)[:, 0]))
    ranked = np.sort(probs)  # a threshold in the widest gap of the middle half: both outcomes occur, no near-tie
    gap = len(ranked) // 4 + int(np.diff(ranked[len(ranked) // 4 : 3 * len(ranked) // 4]).argmax())
    threshold = float(ranked[gap : gap + 2].mean())
    out = run_infer(binary, "classify", texts, threshold=threshold)
    assert out["labels"].to_pylist() == [["toxic"] if p >= threshold else [] for p in probs]
    stored = np.stack(out["probs"].to_numpy(zero_copy_only=False))[:, 0]
    np.testing.assert_allclose(stored, probs, atol=ATOL)
    at = float(stored[gap % len(stored)])  # a threshold equal to a row's stored probability: that row is labeled
    assert run_infer(binary, "classify", texts, threshold=at)["labels"].to_pylist() == [["toxic"] if p >= at else [] for p in stored]

    vector = checkpoint(tmp_path / "vector", bpe_dir, "RobertaForSequenceClassification", num_labels=2, problem_type="regression")
    out = run_infer(vector, "classify", texts)
    assert out.schema.field("score").type == pa.list_(pa.float32(), 2)
    np.testing.assert_allclose(np.stack(out["score"].to_numpy(zero_copy_only=False)), reference.classify(vector, texts), atol=ATOL)

    (tmp_path / "one").mkdir()  # a softmax over one output: probability 1 for every row, refused
    (tmp_path / "one" / "config.json").write_text(json.dumps({"architectures": ["RobertaForSequenceClassification"],
                                                              "num_labels": 1, "problem_type": "single_label_classification"}))  # fmt: skip
    with pytest.raises(TaskError, match="single_label_classification with one output gives every row probability 1"):
        make_task("classify", str(tmp_path / "one")).check()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embed_equals_transformers_mean_pooling(checkpoints, texts, dtype, layers):
    out = run_infer(checkpoints["base"], "embed", texts, budget=256, shuffle_seed=3, embedding_dtype=dtype)
    got = np.stack(out["embedding"].to_numpy(zero_copy_only=False))
    assert got.dtype == np.dtype(dtype) and out.schema.field("embedding").type.list_size == 32
    np.testing.assert_allclose(got, reference.embed(checkpoints["base"], texts), atol=ATOL if dtype == "float32" else 1e-2)


@pytest.mark.parametrize("pooling, normalize", [("cls", False), ("pooler", False), ("mean", True), ("pooler", True)])
def test_embed_pooling_and_normalize_equal_transformers(checkpoints, texts, pooling, normalize):
    out = run_infer(checkpoints["base"], "embed", texts, budget=256, pooling=pooling, normalize=normalize)
    np.testing.assert_allclose(np.stack(out["embedding"].to_numpy(zero_copy_only=False)),
                               reference.embed(checkpoints["base"], texts, pooling, normalize), atol=ATOL)  # fmt: skip


def test_fill_mask_top_k_at_every_mask(checkpoints, layers):
    texts = ["The movie was <mask>.", "No mask here.", "<mask> acting, <mask> plot and a <mask> ending.", ""]
    out = run_infer(checkpoints["masked_lm"], "fill-mask", texts, budget=40, shuffle_seed=4, top_k=3)
    expected = reference.fill_mask(checkpoints["masked_lm"], texts, top_k=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoints["masked_lm"])
    for row, ref_row in zip(out["predictions"].to_pylist(), expected):
        assert len(row) == len(ref_row)  # one entry per <mask>; rows without a mask: []
        for predictions, (ids, probs) in zip(row, ref_row):
            assert [p["token_id"] for p in predictions] == ids
            assert [p["token"] for p in predictions] == [tokenizer.decode([i]) for i in ids]
            np.testing.assert_allclose([p["probability"] for p in predictions], probs, atol=ATOL)


def test_score_causal_log_likelihood(checkpoints, texts, layers):
    out = run_infer(checkpoints["causal_lm"], "score", texts, budget=500, shuffle_seed=5)
    expected = reference.causal_log_likelihood(checkpoints["causal_lm"], texts)
    np.testing.assert_allclose(out["log_likelihood"].to_numpy(), [e[0] for e in expected], rtol=1e-5, atol=1e-3)
    assert out["num_tokens"].to_pylist() == [e[1] for e in expected]
    np.testing.assert_allclose(out["perplexity"].to_numpy(), [np.exp(-ll / n) for ll, n in expected], rtol=1e-4)


def test_score_lm_head_in_chunks_of_a_few_positions(checkpoints, texts, monkeypatch):
    """The LM head's chunks (pipeline.tasks.LM_HEAD_CHUNK_BYTES) cut at 3 positions: the same
    log-likelihoods as the reference, causal and pseudo-LL."""
    import pipeline.tasks

    vocab = RobertaConfig.from_pretrained(checkpoints["causal_lm"]).vocab_size
    monkeypatch.setattr(pipeline.tasks, "LM_HEAD_CHUNK_BYTES", 3 * 4 * vocab)
    short = [t[:80] for t in texts[:5]]
    for model, expected in [("causal_lm", reference.causal_log_likelihood), ("masked_lm", reference.pseudo_log_likelihood)]:
        out = run_infer(checkpoints[model], "score", short, budget=300)
        np.testing.assert_allclose(out["log_likelihood"].to_numpy(), [e[0] for e in expected(checkpoints[model], short)], rtol=1e-5, atol=1e-3)


def test_score_long_documents_with_stride(checkpoints, texts, layers):
    long = [t for t in texts if len(t) > 1500][:4] + ["Short one."]
    batch = table(long)
    tokens = Tokenize(str(checkpoints["causal_lm"]), max_length=10**9)(batch)
    assert max(tokens["input_tokens"].to_pylist()) > 2 * reference.MAX_TOKENS  # several windows
    out = Infer(str(checkpoints["causal_lm"]), "score", TaskOptions(stride=48), batch_tokens=400, device="cpu")(tokens)
    expected = reference.causal_log_likelihood_strided(checkpoints["causal_lm"], long, stride=48)
    assert out["num_tokens"].to_pylist() == [n - 1 for n in tokens["input_tokens"].to_pylist()] == [e[1] for e in expected]
    np.testing.assert_allclose(out["log_likelihood"].to_numpy(), [e[0] for e in expected], rtol=1e-5, atol=1e-3)
    with pytest.raises(TaskError, match="--stride 200"):
        Infer(str(checkpoints["causal_lm"]), "score", TaskOptions(stride=200), device="cpu")


def test_score_pseudo_log_likelihood(checkpoints, texts, layers):
    short = [t[:80] for t in texts[:6]] + ["", "Fine."]
    out = run_infer(checkpoints["masked_lm"], "score", short, budget=300, shuffle_seed=6)
    expected = reference.pseudo_log_likelihood(checkpoints["masked_lm"], short)
    np.testing.assert_allclose(out["log_likelihood"].to_numpy(), [e[0] for e in expected], rtol=1e-5, atol=1e-3)
    assert out["num_tokens"].to_pylist() == [e[1] for e in expected]
    assert np.isnan(out["perplexity"].to_numpy()[6])  # empty text: nothing to score


def test_task_needs_the_right_head(checkpoints, tmp_path):
    with pytest.raises(TaskError, match=r"task 'fill-mask' needs .*masked_lm.*Tasks this checkpoint supports: \['classify', 'embed'\]"):
        make_task("fill-mask", str(checkpoints["classifier"])).check()
    with pytest.raises(TaskError, match="unknown task 'translate'"):
        make_task("translate", str(checkpoints["classifier"]))
    bert = tmp_path / "bert"  # a BERT head checkpoint: only its base model runs (model/loading.py)
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(TaskError, match=r"task 'score' needs .* has only the base model. Tasks this checkpoint supports: \['embed'\]"):
        make_task("score", str(bert)).check()
    with pytest.raises(FileNotFoundError, match="needs config.json"):
        make_task("embed", str(tmp_path)).check()


@pytest.mark.parametrize("task, model, options, error", [
    ("classify", "classifier", dict(stride=64), "--stride is an option of the score task, not of 'classify'"),
    ("score", "causal_lm", dict(stride=0), r"--stride 0: must be between 1 and the window \(128 tokens\)"),
    ("score", "masked_lm", dict(stride=128), r"--stride 128: must be between 1"),
    ("embed", "base", dict(pooling="max"), r"pooling 'max': choose one of \('mean', 'cls', 'pooler'\)"),
    ("embed", "base", dict(embedding_dtype="bfloat16"), "--embedding-dtype 'bfloat16': choose one of"),
    ("fill-mask", "masked_lm", dict(top_k=0), "--top-k 0: must be at least 1"),
])  # fmt: skip
def test_task_options_are_checked_before_any_model_loads(checkpoints, task, model, options, error):
    with pytest.raises(TaskError, match=error):
        make_task(task, str(checkpoints[model]), TaskOptions(**options)).check()


def test_pooler_pooling_on_a_checkpoint_without_one_names_the_flags(checkpoints):
    """The hint names the CLI's flags, and the error still lists every other problem."""
    from model import CheckpointError

    with pytest.raises(CheckpointError, match=r"missing keys: \['pooler.dense.bias', 'pooler.dense.weight'\]\n  \(this checkpoint has no pooler: use --pooling mean or cls\)"):
        make_task("embed", str(checkpoints["masked_lm"]), TaskOptions(pooling="pooler")).check_weights()


@pytest.mark.parametrize("task, model, options", [
    ("classify", "classifier", dict(logits=True)), ("classify", "classifier", {}), ("classify", "multi_label", {}),
    ("classify", "multi_label", dict(logits=True)), ("classify", "regression", {}), ("classify", "regression", dict(logits=True)),
    ("embed", "base", {}), ("fill-mask", "masked_lm", {}), ("score", "causal_lm", {}), ("score", "masked_lm", {}),
])  # fmt: skip
def test_a_task_writes_the_columns_it_declares(checkpoints, texts, task, model, options):
    """`Task.output_columns` is what the job checks kept input columns against (they would clash);
    Classify writes its columns by problem type in `columns`, and declares them in `OUTPUTS`."""
    out = run_infer(checkpoints[model], task, texts[:3], **options)
    written = [c for c in out.column_names if c not in ("id", "input_tokens", "truncated", "error")]
    assert written == list(make_task(task, str(checkpoints[model]), TaskOptions(**options)).output_columns())


def test_scoring_a_causal_lm_needs_its_causal_attention(checkpoints, tmp_path):
    """A RobertaForCausalLM saved with is_decoder false attends both ways: every token would see the
    one it is scored on. Refused, rather than log-likelihoods near 0."""
    import shutil

    shutil.copytree(checkpoints["causal_lm"], tmp_path / "lm")
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert config["is_decoder"] and "RobertaForCausalLM" in config["architectures"]
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**config, "is_decoder": False}))
    with pytest.raises(TaskError, match="names a causal LM but has is_decoder false"):
        make_task("score", str(tmp_path / "lm")).check()


def test_stages_need_no_network(checkpoints):
    """Loading a checkpoint and running both stages with every socket connection refused."""
    import subprocess
    import sys

    code = f"""
import socket
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = refuse
import pyarrow as pa
from pipeline.stages import Infer
from pipeline.tokenize import Tokenize
model = {str(checkpoints["masked_lm"])!r}
batch = Tokenize(model)(pa.table({{"id": [1], "text": ["The movie was <mask>."]}}))
print(Infer(model, "fill-mask", device="cpu")(batch)["predictions"][0].as_py()[0][0]["token"] is not None)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-3000:]
