"""The CUDA path of the inference stage: equal to transformers (fp32 on CPU) in every dtype, and a
real CUDA out-of-memory halving the token budget. Marked gpu: skipped on machines without CUDA."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.stages import Infer
from pipeline.tokenize import Tokenize
from pipeline.tasks import TaskOptions
from tests.pipeline import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def tokenize(model_dir, texts):
    return Tokenize(str(model_dir))(pa.table({"id": np.arange(len(texts)), "text": texts}))


def classify_logits(model_dir, texts, **infer_options):
    out = Infer(str(model_dir), "classify", TaskOptions(logits=True), device="cuda", **infer_options)(tokenize(model_dir, texts))
    return np.stack(out["logits"].to_numpy(zero_copy_only=False))


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 5e-2), ("float16", 1e-2)])
def test_cuda_classify_equals_transformers(checkpoints, reviews, dtype, atol):
    texts = reviews[:64]
    np.testing.assert_allclose(classify_logits(checkpoints["classifier"], texts, dtype=dtype),
                               reference.classify(checkpoints["classifier"], texts), atol=atol)  # fmt: skip


def test_cuda_out_of_memory_halves_the_budget(checkpoints, reviews):
    """A real out-of-memory of torch's CUDA allocator: its limit is set to what the warmed-up model
    already holds plus 8 MiB, which the first micro-batch (every row, ~256k tokens) overflows."""
    texts = reviews
    expected = reference.classify(checkpoints["classifier"], texts)
    tokens = tokenize(checkpoints["classifier"], texts)
    infer = Infer(str(checkpoints["classifier"]), "classify", TaskOptions(logits=True), device="cuda", batch_tokens=2**22)
    infer(tokens.slice(0, 4))  # model, cuBLAS workspace and the allocator's first blocks
    _, total = torch.cuda.mem_get_info()
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 8 * 2**20) / total)
    try:
        out = infer(tokens)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert infer.budget < 2**22
    np.testing.assert_allclose(np.stack(out["logits"].to_numpy(zero_copy_only=False)), expected, atol=1e-4)


def test_cuda_score_and_embed_equal_transformers(checkpoints, reviews):
    """The other heads' CUDA paths in fp32: pseudo-log-likelihood (masked copies packed across texts,
    the last layer and the LM head at each copy's masked token only), causal log-likelihood (chunked
    log-softmax) and mean-pooled embeddings."""
    texts = [t[:120] for t in reviews[:12]] + ["", "Fine."]

    def infer(model_dir, task):
        infer = Infer(str(model_dir), task, TaskOptions(), device="cuda", batch_tokens=512)
        return infer(tokenize(model_dir, texts)).sort_by("id")

    for kind, expected in (("masked_lm", reference.pseudo_log_likelihood(checkpoints["masked_lm"], texts)),
                           ("causal_lm", reference.causal_log_likelihood(checkpoints["causal_lm"], texts))):  # fmt: skip
        out = infer(checkpoints[kind], "score")
        np.testing.assert_allclose(out["log_likelihood"].to_numpy(), [e[0] for e in expected], rtol=1e-4, atol=1e-3)
        assert out["num_tokens"].to_pylist() == [e[1] for e in expected]
    embedding = np.stack(infer(checkpoints["base"], "embed")["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(embedding, reference.embed(checkpoints["base"], texts), atol=1e-4)
