"""The reference documentation's RoBERTa examples, adapted to local checkpoints (no hub access).

These are the usage examples of transformers' RoBERTa docs (the docstrings of RobertaForMaskedLM,
RobertaForCausalLM and RobertaForSequenceClassification: fill-mask with its masked-LM loss, causal-LM
loss, single-label and multi-label classification). Instead of "FacebookAI/roberta-base" they load
tiny widened checkpoints built here with transformers, next to a real byte-level BPE (vocab 500,
specials `<s> <pad> </s> <unk> <mask>` at ids 0-4) trained on movie reviews. Each example is one
function run twice, with transformers' classes and with ours, and both runs must agree: the same
predicted tokens, labels and decoded strings, and losses/logits within 1e-4 (fp32).

Adaptations: the small vocabulary splits " Paris" into several tokens, so the masked-LM loss masks
as many tokens as the answer has (the doc's `torch.where(input_ids == mask_token_id, labels, -100)`
needs inputs and labels of the same length); the doc's `from_pretrained(..., num_labels=...,
problem_type=...)` overrides are saved in config.json instead, which our loader reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from model import RobertaForCausalLM, RobertaForMaskedLM, RobertaForSequenceClassification, RobertaTokenizer
from tests.checkpoints import reference, reference_tokenizer, save, train_bpe

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
ATOL = 1e-4

SENTIMENT = {0: "NEGATIVE", 1: "POSITIVE"}
TOPICS = {0: "acting", 1: "plot", 2: "music", 3: "visuals"}
# Seeds whose random heads give varied answers: both sentiments in the batch, 2+ topics per text.
SENTIMENT_SEED, TOPICS_SEED = 8, 4

# Our classes, by the transformers class name they stand in for.
OURS = {
    "RobertaForMaskedLM": RobertaForMaskedLM,
    "RobertaForCausalLM": RobertaForCausalLM,
    "RobertaForSequenceClassification": RobertaForSequenceClassification,
}


# -- local checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_tokenizer(tmp_path_factory, reviews) -> transformers.RobertaTokenizerFast:
    tokenizer = reference_tokenizer(train_bpe(reviews, tmp_path_factory.mktemp("bpe500"), vocab_size=500, vocab_files=True))
    tokenizer.model_max_length = 62  # max_position_embeddings (64) minus RoBERTa's position offset (2)
    assert len(tokenizer) == 500 and tokenizer.convert_tokens_to_ids(SPECIALS) == [0, 1, 2, 3, 4]
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, ref_tokenizer):
    """checkpoint(kind, **config overrides) -> a directory with config.json, model.safetensors and the tokenizer."""
    made: dict[tuple, Path] = {}

    def make(kind: str, **overrides) -> Path:
        key = (kind, repr(sorted(overrides.items())))
        if key not in made:
            directory = tmp_path_factory.mktemp(kind)
            save(reference(kind, vocab_size=len(ref_tokenizer), **overrides), directory)
            ref_tokenizer.save_pretrained(str(directory))
            made[key] = directory
        return made[key]

    return make


def load(stack: str, kind: str, directory: Path):
    """The doc's `AutoTokenizer.from_pretrained(ckpt)` + `{model_class}.from_pretrained(ckpt)`, per stack."""
    if stack == "transformers":
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
        model = getattr(transformers, kind).from_pretrained(str(directory))
    else:
        tokenizer = RobertaTokenizer.from_pretrained(directory)
        model = OURS[kind].from_pretrained(directory)
    model.eval()
    assert model.dtype == torch.float32
    return tokenizer, model


def run_both(example, kind: str, directory: Path, *args) -> tuple[dict, dict]:
    """Run the same example code with transformers' classes, then with ours."""
    results = {}
    for stack in ("transformers", "ours"):
        tokenizer, model = load(stack, kind, directory)
        with torch.no_grad():
            results[stack] = example(tokenizer, model, *args)
    return results["transformers"], results["ours"]


def assert_agree(ref: dict, ours: dict) -> None:
    """Floats/tensors of floats within ATOL; everything else (ids, labels, strings) identical."""
    assert ref.keys() == ours.keys()
    for key, expected in ref.items():
        got = ours[key]
        if isinstance(expected, float):
            assert got == pytest.approx(expected, abs=ATOL), key
        elif isinstance(expected, torch.Tensor) and expected.is_floating_point():
            assert got.dtype == expected.dtype and got.shape == expected.shape, key
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=key)
        elif isinstance(expected, torch.Tensor):
            assert got.dtype == expected.dtype and torch.equal(got, expected), key
        else:
            assert got == expected, key


# -- the examples, written once for both stacks ----------------------------------------------------


def fill_mask_example(tokenizer, model, masked: str, answer: str) -> dict:
    # RobertaForMaskedLM: predict the token at <mask>.
    inputs = tokenizer(masked, return_tensors="pt")
    logits = model(**inputs).logits
    # retrieve index of <mask>
    mask_token_index = (inputs.input_ids == tokenizer.mask_token_id)[0].nonzero(as_tuple=True)[0]
    predicted_token_id = logits[0, mask_token_index].argmax(axis=-1)
    decoded = tokenizer.decode(predicted_token_id)

    # Masked-LM loss: as many <mask> as the answer has tokens in this small vocabulary.
    n_answer = len(tokenizer(answer).input_ids) - len(inputs.input_ids[0]) + 1
    multi = tokenizer(masked.replace("<mask>", "<mask>" * n_answer), return_tensors="pt")
    labels = tokenizer(answer, return_tensors="pt")["input_ids"]
    assert labels.shape == multi.input_ids.shape
    # mask labels of non-<mask> tokens
    labels = torch.where(multi.input_ids == tokenizer.mask_token_id, labels, -100)
    outputs = model(**multi, labels=labels)
    filled = outputs.logits[multi.input_ids == tokenizer.mask_token_id].argmax(-1)
    return {
        "input_ids": inputs.input_ids,
        "mask_token_index": mask_token_index,
        "predicted_token_id": predicted_token_id,
        "decoded": decoded,
        "mask_logits": logits[0, mask_token_index],
        "n_answer": n_answer,
        "labels": labels,
        "loss": outputs.loss.item(),
        "filled": tokenizer.decode(filled),
        "filled_sentence": tokenizer.decode(torch.where(multi.input_ids == tokenizer.mask_token_id,
                                                        outputs.logits.argmax(-1), multi.input_ids)[0],
                                            skip_special_tokens=True),
    }


def causal_lm_example(tokenizer, model, text: str) -> dict:
    # RobertaForCausalLM (is_decoder=True): the loss of the text predicting itself, shifted by one.
    inputs = tokenizer(text, return_tensors="pt")
    outputs = model(**inputs, labels=inputs["input_ids"])
    loss = outputs.loss
    logits = outputs.logits
    next_tokens = logits.argmax(-1)[0]
    return {
        "input_ids": inputs["input_ids"],
        "loss": loss.item(),
        "logits": logits,
        "next_tokens": next_tokens,
        "decoded": tokenizer.decode(next_tokens),
        "last_token": tokenizer.decode(next_tokens[-1:]),
    }


def single_label_example(tokenizer, model, text: str) -> dict:
    inputs = tokenizer(text, return_tensors="pt")
    logits = model(**inputs).logits
    predicted_class_id = logits.argmax().item()
    predicted_label = model.config.id2label[predicted_class_id]

    num_labels = len(model.config.id2label)
    assert model.config.num_labels == num_labels
    labels = torch.tensor([1])
    loss = model(**inputs, labels=labels).loss
    return {
        "logits": logits,
        "predicted_class_id": predicted_class_id,
        "label": predicted_label,
        "loss": loss.item(),
        "rounded_loss": round(loss.item(), 2),
    }


def multi_label_example(tokenizer, model, text: str) -> dict:
    inputs = tokenizer(text, return_tensors="pt")
    logits = model(**inputs).logits
    predicted_class_ids = torch.arange(0, logits.shape[-1])[torch.sigmoid(logits).squeeze(dim=0) > 0.5]

    num_labels = len(model.config.id2label)
    labels = torch.sum(
        torch.nn.functional.one_hot(predicted_class_ids[None, :].clone(), num_classes=num_labels), dim=1
    ).to(torch.float)
    loss = model(**inputs, labels=labels).loss
    # And the loss of a fixed multi-hot target, which is not the prediction.
    target = torch.zeros(1, num_labels)
    target[0, [0, num_labels - 1]] = 1.0
    return {
        "logits": logits,
        "predicted_class_ids": predicted_class_ids,
        "labels_predicted": [model.config.id2label[i.item()] for i in predicted_class_ids],
        "multi_hot": labels,
        "loss": loss.item(),
        "target_loss": model(**inputs, labels=target).loss.item(),
    }


def batch_classification_example(tokenizer, model, texts: list[str]) -> dict:
    # The single-label example on a padded, truncated batch of reviews (the attention mask matters).
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    logits = model(**inputs).logits
    predicted = logits.argmax(-1)
    labels = torch.arange(len(texts)) % model.config.num_labels
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "logits": logits,
        "labels": [model.config.id2label[i] for i in predicted.tolist()],
        "loss": model(**inputs, labels=labels).loss.item(),
    }


# -- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("masked", "answer"), [
    ("The capital of France is <mask>.", "The capital of France is Paris."),
    ("The movie was <mask>.", "The movie was good."),
    ("<mask> is the best film I have seen this year.", "This is the best film I have seen this year."),
])
def test_fill_mask(checkpoint, masked, answer):
    ref, ours = run_both(fill_mask_example, "RobertaForMaskedLM", checkpoint("RobertaForMaskedLM"), masked, answer)
    assert_agree(ref, ours)
    assert ref["mask_token_index"].numel() == 1 and isinstance(ref["decoded"], str)
    assert (ref["labels"] != -100).sum() == ref["n_answer"] and ref["loss"] > 0


@pytest.mark.parametrize("text", ["Hello, my dog is cute", "The movie was good, but the ending was terrible."])
def test_causal_lm(checkpoint, text):
    directory = checkpoint("RobertaForCausalLM", is_decoder=True)
    # The doc sets config.is_decoder = True before loading; the checkpoint here already says so.
    assert transformers.AutoConfig.from_pretrained(str(directory)).is_decoder
    ref, ours = run_both(causal_lm_example, "RobertaForCausalLM", directory, text)
    assert_agree(ref, ours)
    assert ref["loss"] > 0


def sentiment_checkpoint(checkpoint) -> Path:
    return checkpoint("RobertaForSequenceClassification", id2label=SENTIMENT,
                      label2id={v: k for k, v in SENTIMENT.items()}, seed=SENTIMENT_SEED)


@pytest.mark.parametrize("text", ["Hello, my dog is cute", "A dull, lifeless film. I want my money back."])
def test_single_label_classification(checkpoint, text):
    directory = sentiment_checkpoint(checkpoint)
    ref, ours = run_both(single_label_example, "RobertaForSequenceClassification", directory, text)
    assert_agree(ref, ours)
    assert ref["label"] in SENTIMENT.values()


@pytest.mark.parametrize("problem_type", ["multi_label_classification", None])
@pytest.mark.parametrize("text", ["Hello, my dog is cute", "Great acting and a beautiful score."])
def test_multi_label_classification(checkpoint, text, problem_type):
    # With problem_type null both infer multi-label from the float labels.
    directory = checkpoint("RobertaForSequenceClassification", id2label=TOPICS,
                           label2id={v: k for k, v in TOPICS.items()}, problem_type=problem_type, seed=TOPICS_SEED)
    ref, ours = run_both(multi_label_example, "RobertaForSequenceClassification", directory, text)
    assert_agree(ref, ours)
    assert ref["multi_hot"].shape == (1, len(TOPICS)) and len(ref["labels_predicted"]) >= 2


def test_batch_classification(checkpoint, reviews):
    directory = sentiment_checkpoint(checkpoint)
    texts = ["Hello, my dog is cute", reviews[0], "Bad.", reviews[1], reviews[2]]
    ref, ours = run_both(batch_classification_example, "RobertaForSequenceClassification", directory, texts)
    assert_agree(ref, ours)
    assert (ref["attention_mask"] == 0).any()  # some rows are padded
    assert set(ref["labels"]) == set(SENTIMENT.values())  # the argmax differs between rows
