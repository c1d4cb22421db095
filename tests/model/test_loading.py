"""Loading: key table with and without prefixes, sharded files, dtypes, meta-device build, strict
errors for bad checkpoints, our own save readable by transformers, and real weights (all-MiniLM-L6-v2)."""

import dataclasses
import json
import shutil

import pytest
import torch
import transformers

import model as ours
from model import CheckpointError, ConfigError
from model.loading import build_config
from tests.checkpoints import TINY, padded_batch, reference, save

ATOL = 1e-4


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture
def masked_lm_dir(tmp_path):
    return save(reference("RobertaForMaskedLM"), tmp_path / "mlm")


def test_base_model_from_head_checkpoint_drops_the_head(masked_lm_dir):
    """roberta-base is published as a masked-LM checkpoint (keys `roberta.*` + `lm_head.*`):
    the base model loads its body and drops the head."""
    ref = transformers.RobertaModel.from_pretrained(masked_lm_dir, add_pooling_layer=False).eval()
    mine = ours.RobertaModel.from_pretrained(masked_lm_dir, add_pooling_layer=False)
    ids, mask, _ = padded_batch([5, 9])
    with torch.no_grad():
        close(mine(ids, mask).last_hidden_state, ref(ids, mask).last_hidden_state)


def test_no_pooler_in_checkpoint_is_a_clear_error(masked_lm_dir):
    with pytest.raises(CheckpointError, match="add_pooling_layer=False"):
        ours.RobertaModel.from_pretrained(masked_lm_dir)


def test_unprefixed_base_checkpoint_and_sharded_index(tmp_path):
    ref = reference("RobertaModel")
    directory = save(ref, tmp_path / "sharded", max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    mine = ours.RobertaModel.from_pretrained(directory)
    ids, mask, _ = padded_batch([5, 9])
    with torch.no_grad():
        close(mine(ids, mask).last_hidden_state, ref(ids, mask).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16"])
def test_dtype_and_meta_build(masked_lm_dir, dtype):
    mine = ours.RobertaForMaskedLM.from_pretrained(masked_lm_dir, dtype=dtype)
    expected_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert all(p.device.type == "cpu" and p.dtype == expected_dtype for p in mine.parameters())
    assert not any(t.is_meta for t in mine.state_dict().values())
    # the LM decoder stays tied to the word embeddings
    assert mine.lm_head.decoder.weight.data_ptr() == mine.roberta.embeddings.word.weight.data_ptr()
    ids, mask, _ = padded_batch([5, 9])
    ref = transformers.RobertaForMaskedLM.from_pretrained(masked_lm_dir).eval()
    with torch.no_grad():
        got = mine(ids, mask).logits.float()
        expected = ref(ids, mask).logits
    assert (got - expected).abs().max() < 0.25 * expected.abs().max()  # reduced precision, same function


def test_dtype_auto_is_the_checkpoints_as_in_transformers(tmp_path):
    """dtype="auto" (torch_dtype, transformers 4's name, too): config.json's dtype, else the
    weights'; a model saved by us in bf16 loads in bf16 in transformers' default ("auto")."""
    directory = save(reference("RobertaForMaskedLM").to(torch.bfloat16), tmp_path / "bf16")
    expected = transformers.RobertaForMaskedLM.from_pretrained(directory, dtype="auto").dtype
    assert expected == torch.bfloat16
    assert ours.RobertaForMaskedLM.from_pretrained(directory, dtype="auto").dtype == expected
    assert ours.RobertaForMaskedLM.from_pretrained(directory, torch_dtype="auto").dtype == expected
    assert ours.RobertaForMaskedLM.from_pretrained(directory).dtype == torch.float32  # None: transformers 4's default
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "dtype"}))
    assert ours.RobertaForMaskedLM.from_pretrained(directory, dtype="auto").dtype == torch.bfloat16  # from the weights
    ours.RobertaForMaskedLM.from_pretrained(directory, dtype=torch.float16).save_pretrained(tmp_path / "ours")
    assert transformers.RobertaForMaskedLM.from_pretrained(tmp_path / "ours").dtype == torch.float16
    assert ours.RobertaForMaskedLM.from_pretrained(directory, dtype="float64").dtype == torch.float64
    config = ours.RobertaConfig.from_pretrained(directory)
    (directory / "config.json").unlink()  # config= given: "auto" reads the weights
    assert ours.RobertaForMaskedLM.from_pretrained(directory, config=config, dtype="auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="'int8': a model's weights need a floating dtype"):
        ours.RobertaForMaskedLM.from_pretrained(directory, dtype="int8")


def test_config_fields_and_config_override_config_json(masked_lm_dir, tmp_path):
    """transformers' way to run a masked-LM checkpoint as a decoder: `is_decoder=True`, or a
    `config=`; `num_labels=` gives a new head's labels. Anything else is named."""
    ids, mask, _ = padded_batch([5, 9])
    ref = transformers.RobertaForCausalLM.from_pretrained(masked_lm_dir, is_decoder=True).eval()
    config = ours.RobertaConfig.from_pretrained(masked_lm_dir)
    with torch.no_grad():
        expected = ref(ids, mask).logits
        for mine in (ours.RobertaForCausalLM.from_pretrained(masked_lm_dir, is_decoder=True),
                     ours.RobertaForCausalLM.from_pretrained(masked_lm_dir, config=dataclasses.replace(config, is_decoder=True))):  # fmt: skip
            assert mine.config.is_decoder
            close(mine(ids, mask).logits, expected)
    two = save(reference("RobertaForSequenceClassification", num_labels=2, id2label={0: "no", 1: "yes"}), tmp_path / "two")
    theirs = transformers.RobertaConfig.from_pretrained(two, num_labels=3)
    relabeled, _ = build_config(ours.RobertaForSequenceClassification, two, None, {"num_labels": 3})
    assert relabeled.id2label == theirs.id2label and relabeled.label2id == theirs.label2id
    for overrides in ({"num_labels": 2}, {"id2label": {0: "a", 1: "b", 2: "c"}}):  # names kept; names give the number
        ours_config, _ = build_config(ours.RobertaForSequenceClassification, two, None, dict(overrides))
        theirs = transformers.RobertaConfig.from_pretrained(two, **overrides)
        assert (ours_config.num_labels, ours_config.id2label) == (theirs.num_labels, theirs.id2label)
        assert ours_config.label2id == {v: k for k, v in ours_config.id2label.items()}  # transformers leaves it None here
    with pytest.raises(CheckpointError, match=r"classifier.out_proj.weight: checkpoint \(2, 32\), model \(3, 32\)"):
        ours.RobertaForSequenceClassification.from_pretrained(two, num_labels=3)
    with pytest.raises(TypeError, match=r"unknown arguments \['device_map'\].*add_pooling_layer"):
        ours.RobertaModel.from_pretrained(masked_lm_dir, device_map="auto")


def test_our_save_is_read_by_transformers(tmp_path):
    """Checkpoints saved with our own code (benchmarks use them) load in transformers unchanged."""
    for kind in ["RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification"]:
        mine = getattr(ours, kind).from_pretrained(save(reference(kind), tmp_path / kind))
        mine.save_pretrained(tmp_path / f"ours-{kind}")
        ref = getattr(transformers, kind).from_pretrained(tmp_path / f"ours-{kind}").eval()
        again = getattr(ours, kind).from_pretrained(tmp_path / f"ours-{kind}")
        ids, mask, _ = padded_batch([5, 9])
        with torch.no_grad():
            close(mine(ids, mask)[0], ref(ids, mask)[0])
            close(again(ids, mask)[0], ref(ids, mask)[0])


def test_untied_lm_head_bias_transfers_both_ways(tmp_path):
    """transformers 5 unties `lm_head.decoder.bias` from `lm_head.bias` along with the word
    embeddings, and its logits use the decoder's copy: after training, the two differ."""
    ref = reference("RobertaForMaskedLM", tie_word_embeddings=False)
    with torch.no_grad():
        ref.lm_head.decoder.bias.normal_()  # what training does to the copy the logits use
    assert not torch.equal(ref.lm_head.decoder.bias, ref.lm_head.bias)
    mine = ours.RobertaForMaskedLM.from_pretrained(save(ref, tmp_path / "theirs"))
    mine.save_pretrained(tmp_path / "ours")
    again = transformers.RobertaForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    ids, mask, _ = padded_batch([5, 9])
    with torch.no_grad():
        close(mine(ids, mask).logits, ref(ids, mask).logits)
        close(again(ids, mask).logits, ref(ids, mask).logits)


def test_a_model_built_from_a_config_starts_as_transformers_initialises_it():
    """Same init scheme, parameter by parameter (the random draws differ): standard deviation,
    and zeros exactly where transformers has them (biases, padding rows)."""
    from model.loading import checkpoint_key

    config = dict(TINY, vocab_size=500, hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    mine = ours.RobertaForSequenceClassification(ours.RobertaConfig(**config))
    theirs = dict(transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**config)).named_parameters())
    for name, param in mine.named_parameters():
        expected = theirs[checkpoint_key(name, "roberta.")]
        assert param.std().item() == pytest.approx(expected.std().item(), rel=0.2, abs=1e-6), name
        assert torch.equal(param == 0, expected == 0), name


# ----------------------------------------------------------------------------- bad checkpoints
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ours.RobertaModel.from_pretrained(tmp_path / "nope")


def test_missing_config(masked_lm_dir):
    (masked_lm_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ours.RobertaForMaskedLM.from_pretrained(masked_lm_dir)


def test_missing_weights(masked_lm_dir):
    (masked_lm_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights.*model.safetensors"):
        ours.RobertaForMaskedLM.from_pretrained(masked_lm_dir)


def test_pickle_only_weights_are_refused_and_never_unpickled(masked_lm_dir, monkeypatch):
    (masked_lm_dir / "model.safetensors").unlink()
    (masked_lm_dir / "pytorch_model.bin").write_bytes(b"not even a pickle")

    def never(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(CheckpointError, match="pickle.*arbitrary code.*safetensors"):
        ours.RobertaForMaskedLM.from_pretrained(masked_lm_dir)


def test_unknown_model_type(masked_lm_dir):
    config = json.loads((masked_lm_dir / "config.json").read_text())
    (masked_lm_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type.*gpt2"):
        ours.RobertaForMaskedLM.from_pretrained(masked_lm_dir)


def test_unimplemented_position_embedding_type(masked_lm_dir):
    config = json.loads((masked_lm_dir / "config.json").read_text())
    (masked_lm_dir / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))
    with pytest.raises(ConfigError, match="position_embedding_type"):
        ours.RobertaForMaskedLM.from_pretrained(masked_lm_dir)


def test_vocab_smaller_than_tokenizer(masked_lm_dir, minilm_dir):
    shutil.copy(minilm_dir / "tokenizer.json", masked_lm_dir / "tokenizer.json")  # 30,522 tokens vs vocab 99
    with pytest.raises(CheckpointError, match="30522 tokens but config.json vocab_size is 99"):
        ours.RobertaForMaskedLM.from_pretrained(masked_lm_dir)


def test_mismatched_shapes_listed(tmp_path):
    directory = save(reference("RobertaForMaskedLM"), tmp_path / "mlm")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(CheckpointError, match=r"mismatched tensors.*intermediate.dense.weight: checkpoint \(37, 32\), model \(40, 32\)"):
        ours.RobertaForMaskedLM.from_pretrained(directory)


def test_missing_and_unexpected_keys_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = save(reference("RobertaForMaskedLM"), tmp_path / "mlm")
    tensors = load_file(directory / "model.safetensors")
    tensors.pop("roberta.encoder.layer.1.output.dense.bias")
    tensors["roberta.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        ours.RobertaForMaskedLM.from_pretrained(directory)
    assert "roberta.encoder.layer.0.attention.self.rotary.weight" in str(err.value)
    assert "missing keys: ['roberta.encoder.layer.1.output.dense.bias']" in str(err.value)


def test_keys_under_another_models_prefix_are_unexpected(tmp_path):
    """A RoBERTa config takes its body under `roberta.` (or no prefix), never BERT's `bert.`."""
    from safetensors.torch import load_file, save_file

    directory = save(reference("RobertaForMaskedLM"), tmp_path / "mlm")
    tensors = load_file(directory / "model.safetensors")
    save_file({k.replace("roberta.", "bert.", 1): v for k, v in tensors.items()}, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*'bert\.embeddings"):
        ours.RobertaForMaskedLM.from_pretrained(directory)


def test_head_the_checkpoint_lacks(masked_lm_dir):
    with pytest.raises(CheckpointError, match="missing keys.*classifier"):
        ours.RobertaForSequenceClassification.from_pretrained(masked_lm_dir)


def test_config_round_trip_and_labels():
    config = ours.RobertaConfig(**TINY, id2label={"0": "neg", "1": "pos"})
    assert config.num_labels == 2 and config.label2id == {"neg": 0, "pos": 1}
    assert ours.RobertaConfig.from_dict(config.to_dict()) == config
    assert ours.RobertaConfig(num_labels=3).id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with pytest.raises(ConfigError, match="hidden_act"):
        ours.RobertaConfig(hidden_act="swiglu")


def test_config_defaults_are_transformers_defaults():
    """A config.json that leaves a field out means the same to both (BERT's 512 positions, 2 token
    types, eps 1e-12: not roberta-base's values)."""
    theirs, compared = transformers.RobertaConfig(), 0
    for name, value in ours.RobertaConfig().to_dict().items():
        # transformers derives the label fields too (tested below); 5.x dropped position_embedding_type.
        if name not in ("num_labels", "id2label", "label2id") and hasattr(theirs, name):
            assert getattr(theirs, name) == value, name
            compared += 1
    assert compared >= 20


@pytest.mark.parametrize("labels", [dict(id2label={0: "toxic"}), dict(id2label={0: "neg", 1: "pos"}), dict(num_labels=3), {}])
def test_labels_as_transformers_writes_and_reads_them(tmp_path, labels):
    """transformers 5 writes null for the label2id and num_labels it was not given (and reads such a
    label2id back as None); ours is then id2label's inverse."""
    transformers.RobertaConfig(**TINY, **labels).save_pretrained(tmp_path)
    theirs = transformers.RobertaConfig.from_pretrained(tmp_path)
    mine = ours.RobertaConfig.from_pretrained(tmp_path)
    assert (mine.num_labels, mine.id2label) == (theirs.num_labels, theirs.id2label)
    assert mine.label2id == {name: i for i, name in theirs.id2label.items()}


# ----------------------------------------------------------------------------- real weights
def test_minilm_real_weights_match_reference_and_sentence_transformers(minilm_dir, layers):
    """all-MiniLM-L6-v2 (BERT architecture, real published weights) through our classes, given the
    rows' lengths: with padded layers and with layers on the real tokens only (`layers`)."""
    from sentence_transformers import SentenceTransformer

    texts = ["A gripping, beautifully shot film.", "Dull.", "The plot meanders but the cast is superb and I would watch it again."]
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
    mine = ours.RobertaModel.from_pretrained(minilm_dir)
    with torch.no_grad():
        expected = ref(**batch, output_hidden_states=True)
        got = mine(**batch, output_hidden_states=True, lengths=batch["attention_mask"].sum(1).tolist())
    real = batch["attention_mask"].bool()
    for a, b in zip(got.hidden_states, expected.hidden_states):
        close(a[real], b[real])
    close(got.pooler_output, expected.pooler_output)

    st = SentenceTransformer(str(minilm_dir), device="cpu")
    reference_embeddings = torch.from_numpy(st.encode(texts, normalize_embeddings=True))
    embeddings = ours.sentence_embedding(got, batch["attention_mask"], "mean", normalize=True)
    cosine = torch.nn.functional.cosine_similarity(embeddings, reference_embeddings)
    assert cosine.min() >= 0.9999, cosine


def test_bert_checkpoint_refused_for_heads(minilm_dir):
    with pytest.raises(CheckpointError, match="base model only"):
        ours.RobertaForMaskedLM.from_pretrained(minilm_dir)
