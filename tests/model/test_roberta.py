"""Our RoBERTa classes against transformers' (the reference), fp32, max abs difference < 1e-4.

Every reference is a widened tiny random model saved with transformers' own `save_pretrained` and
loaded through our loader, so these tests cover the key table as well as the forward pass."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import model as ours
from tests.checkpoints import TINY, padded_batch, reference, save

ATOL = 1e-4
LENGTHS = [9, 4, 12, 1 + 1]  # mixed lengths: every batch is padded


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def load_pair(tmp_path, kind, ours_cls=None, **overrides):
    ref = reference(kind, **overrides)
    mine = (ours_cls or getattr(ours, kind)).from_pretrained(save(ref, tmp_path / kind))
    return ref, mine


@pytest.mark.parametrize("type_vocab_size", [1, 2])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu", "silu", "tanh"])
def test_base_model_matches_reference(tmp_path, type_vocab_size, hidden_act):
    ref, mine = load_pair(tmp_path, "RobertaModel", type_vocab_size=type_vocab_size, hidden_act=hidden_act)
    ids, mask, types = padded_batch(LENGTHS, type_vocab_size=type_vocab_size)
    kwargs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types if type_vocab_size > 1 else None)
    with torch.no_grad():
        expected = ref(**kwargs, output_hidden_states=True, output_attentions=True)
        got = mine(**kwargs, output_hidden_states=True, output_attentions=True)
        fast = mine(**kwargs)  # SDPA path (no attention maps requested)
    close(got.last_hidden_state, expected.last_hidden_state)
    close(fast.last_hidden_state, expected.last_hidden_state)
    close(got.pooler_output, expected.pooler_output)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    for a, b in zip(got.hidden_states, expected.hidden_states):
        close(a, b)
    for a, b in zip(got.attentions, expected.attentions):
        close(a, b)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_hidden_at_equals_the_reference_last_hidden_state_there(tmp_path, is_decoder):
    """`hidden_at` runs the last layer's queries only at the given positions (two per row here,
    one of them on padding) and must give the reference's last hidden state at those positions."""
    ref, mine = load_pair(tmp_path, "RobertaModel", is_decoder=is_decoder)
    ids, mask, _ = padded_batch(LENGTHS)
    index = torch.tensor([[0, 3], [2, 8], [11, 0], [1, 5]])  # (B, n); row 1's 8 and row 3's 5 are pads
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = mine.hidden_at(ids, mask, index)
    close(got, expected.gather(1, index[..., None].expand(-1, -1, expected.shape[-1])))


def test_position_ids_are_padding_aware():
    """RoBERTa positions start at pad+1 and count real tokens only; pads keep the pad position."""
    m = ours.RobertaModel(ours.RobertaConfig(**TINY))
    ids = torch.tensor([[0, 7, 8, 2, 1, 1]])
    expected = transformers.models.roberta.modeling_roberta.RobertaEmbeddings.create_position_ids_from_input_ids(ids, 1)
    assert torch.equal(m.embeddings.position_ids(ids, None, 0), expected)
    assert m.embeddings.position_ids(ids, None, 0).tolist() == [[2, 3, 4, 5, 1, 1]]


def test_inputs_embeds_and_explicit_position_ids(tmp_path):
    ref, mine = load_pair(tmp_path, "RobertaModel")
    ids, mask, _ = padded_batch(LENGTHS)
    embeds = ref.embeddings.word_embeddings(ids).detach()
    positions = torch.arange(ids.shape[1]).expand_as(ids) + 2
    with torch.no_grad():
        close(mine(inputs_embeds=embeds, attention_mask=mask).last_hidden_state,
              ref(inputs_embeds=embeds, attention_mask=mask).last_hidden_state)  # fmt: skip
        close(mine(ids, mask, position_ids=positions).last_hidden_state,
              ref(ids, mask, position_ids=positions).last_hidden_state)  # fmt: skip
    with pytest.raises(ValueError, match="exactly one"):
        mine()


def test_head_mask_matches_reference_with_scaled_output_projection(tmp_path):
    """transformers 5 dropped head_mask; its semantics (scale head h's attention probabilities by m)
    equal scaling the columns of head h in the attention output projection, which the reference can do."""
    ref, mine = load_pair(tmp_path, "RobertaModel")
    head_mask = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 0.25]])  # (L, nh)
    with torch.no_grad():
        for layer, m in zip(ref.encoder.layer, head_mask):
            w = layer.attention.output.dense.weight  # (H, nh*hs)
            w.mul_(m.repeat_interleave(w.shape[1] // len(m))[None, :])
        ids, mask, _ = padded_batch(LENGTHS)
        close(mine(ids, mask, head_mask=head_mask).last_hidden_state, ref(ids, mask).last_hidden_state)
        one_dim = mine(ids, mask, head_mask=head_mask[0]).last_hidden_state  # (nh,) applies to every layer
        close(one_dim, mine(ids, mask, head_mask=head_mask[0].expand(len(head_mask), -1)).last_hidden_state)


def test_masked_lm_logits_and_loss(tmp_path):
    ref, mine = load_pair(tmp_path, "RobertaForMaskedLM")
    ids, mask, _ = padded_batch(LENGTHS)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    labels[0, 3] = ids[0, 3]
    with torch.no_grad():
        expected, got = ref(ids, mask, labels=labels), mine(ids, mask, labels=labels)
    close(got.logits, expected.logits)
    close(got.loss, expected.loss)
    # The LM head at chosen positions only equals the full logits there.
    hidden = mine.roberta(ids, mask).last_hidden_state
    close(mine.logits(hidden, labels != -100), expected.logits[labels != -100])


def test_causal_lm_loss_and_incremental_decoding(tmp_path):
    ref, mine = load_pair(tmp_path, "RobertaForCausalLM", is_decoder=True)
    ids, mask, _ = padded_batch([10, 10, 10])
    with torch.no_grad():
        expected = ref(ids, mask, labels=ids)
        got = mine(ids, mask, labels=ids)
        close(got.logits, expected.logits)
        close(got.loss, expected.loss)
        # Decode 4 prefix tokens, then one token at a time with the cache: same logits as one pass.
        out = mine(ids[:, :4], mask[:, :4], use_cache=True)
        steps, past = [out.logits], out.past_key_values
        assert len(past) == 2 and past[0][0].shape == (3, 4, 4, 8)  # (B, nh, S, hs)
        for t in range(4, 10):
            out = mine(ids[:, t : t + 1], mask[:, : t + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
    close(torch.cat(steps, dim=1), expected.logits)


def test_causal_mask_hides_the_future(tmp_path):
    _, mine = load_pair(tmp_path, "RobertaForCausalLM", is_decoder=True)
    ids, mask, _ = padded_batch([10])
    changed = ids.clone()
    changed[0, 7] = 50
    with torch.no_grad():
        a, b = mine(ids, mask).logits, mine(changed, mask).logits
    close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_cross_attention_with_cache(tmp_path):
    ref, mine = load_pair(tmp_path, "RobertaForCausalLM", is_decoder=True, add_cross_attention=True)
    ids, mask, _ = padded_batch([8, 8])
    encoder_states = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    encoder_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    kw = dict(encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_mask)
    with torch.no_grad():
        expected = ref(ids, mask, **kw, output_attentions=True)
        got = mine(ids, mask, **kw, output_attentions=True)
        close(got.logits, expected.logits)
        for a, b in zip(got.cross_attentions, expected.cross_attentions):
            close(a, b)
        out = mine(ids[:, :3], mask[:, :3], **kw, use_cache=True)
        steps, past = [out.logits], out.past_key_values
        assert len(past[0]) == 4  # self k, v + cross k, v
        for t in range(3, 8):
            out = mine(ids[:, t : t + 1], mask[:, : t + 1], **kw, past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
    close(torch.cat(steps, dim=1), expected.logits)


@pytest.mark.parametrize(
    "num_labels, problem_type, labels",
    [
        (1, None, torch.tensor([0.5, -1.0, 2.0, 0.0])),
        (3, None, torch.tensor([0, 2, 1, 1])),
        (3, None, torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])),
        (3, "multi_label_classification", torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])),
        (2, "regression", torch.tensor([[0.5, 1.0], [0, 0], [1, 2], [3, 0]])),
    ],
)
def test_sequence_classification_problem_types(tmp_path, num_labels, problem_type, labels):
    ref, mine = load_pair(tmp_path, "RobertaForSequenceClassification", num_labels=num_labels, problem_type=problem_type)
    ids, mask, _ = padded_batch(LENGTHS)
    with torch.no_grad():
        expected, got = ref(ids, mask, labels=labels), mine(ids, mask, labels=labels)
    close(got.logits, expected.logits)
    close(got.loss, expected.loss)
    assert mine.config.problem_type == problem_type  # frozen: inference does not write back


@pytest.mark.parametrize("kind, is_decoder", [("RobertaModel", False), ("RobertaModel", True), ("RobertaForCausalLM", True),
                                              ("RobertaForMaskedLM", False), ("RobertaForSequenceClassification", False)])  # fmt: skip
def test_return_dict_false_gives_the_reference_tuple(tmp_path, kind, is_decoder):
    """A decoder's tuple holds its cache before the hidden states (ours: the legacy per-layer
    (k, v) tuples; the reference's: a Cache object holding the same tensors)."""
    ref, mine = load_pair(tmp_path, kind, is_decoder=is_decoder)
    ids, mask, _ = padded_batch(LENGTHS)
    with torch.no_grad():
        expected = ref(ids, mask, output_hidden_states=True, return_dict=False)
        got = mine(ids, mask, output_hidden_states=True, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(expected)
    for a, b in zip(got, expected):
        if isinstance(b, transformers.Cache):
            b = [(layer.keys, layer.values) for layer in b.layers]
            a = [tuple(kv) for kv in a]
        if isinstance(a, (tuple, list)):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        else:
            close(a, b)


def test_an_encoder_ignores_encoder_hidden_states_as_the_reference_does(tmp_path):
    ref, mine = load_pair(tmp_path, "RobertaForMaskedLM")
    ids, mask, _ = padded_batch(LENGTHS)
    states = torch.randn(len(LENGTHS), 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        close(mine(ids, mask, encoder_hidden_states=states).logits, ref(ids, mask, encoder_hidden_states=states).logits)


def test_outputs_are_mappings_like_the_references(tmp_path):
    """`return_dict=None` is the default (an output object); the object is a mapping of its non-None
    fields, as transformers' ModelOutput (an OrderedDict) is."""
    ref, mine = load_pair(tmp_path, "RobertaForMaskedLM")
    ids, mask, _ = padded_batch(LENGTHS)
    with torch.no_grad():
        expected = ref(ids, mask, labels=ids, return_dict=None)
        got = mine(ids, mask, labels=ids, return_dict=None)
    assert list(got.keys()) == list(expected.keys()) == ["loss", "logits"]
    assert ("loss" in got, "attentions" in got, len(got)) == ("loss" in expected, "attentions" in expected, len(expected))
    assert [name for name, _ in got.items()] == list(got) == list(expected)
    close(dict(**got)["logits"], expected.get("logits"))
    for out in (got, expected):
        assert out.get("attentions") is None and out.attentions is None
        with pytest.raises(KeyError):
            out["attentions"]


def test_the_config_sets_the_default_of_output_hidden_states_and_attentions(tmp_path):
    ref, mine = load_pair(tmp_path, "RobertaModel", output_hidden_states=True, output_attentions=True)
    ids, mask, _ = padded_batch(LENGTHS)
    with torch.no_grad():
        expected, got = ref(ids, mask), mine(ids, mask)
        assert mine(ids, mask, output_attentions=False).attentions is None
    assert len(got.hidden_states) == len(expected.hidden_states) and len(got.attentions) == len(expected.attentions)
    close(got.hidden_states[1], expected.hidden_states[1])
    close(got.attentions[1], expected.attentions[1])


@pytest.mark.parametrize("kind", ["RobertaForMaskedLM", "RobertaForCausalLM", "RobertaForSequenceClassification"])
def test_training_gradients_match_the_reference(tmp_path, kind):
    """One backward pass in train mode (dropout 0, so both are deterministic) on a padded batch, with
    the common `labels=input_ids` for the LMs: every parameter gets the reference's gradient, the
    position table's padding row included (none)."""
    from model.loading import checkpoint_key

    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref, mine = load_pair(tmp_path, kind, is_decoder=kind == "RobertaForCausalLM", **no_dropout)
    ids, mask, _ = padded_batch(LENGTHS)
    labels = torch.tensor([1, 0, 1, 0]) if kind == "RobertaForSequenceClassification" else ids
    for model in (ref.train(), mine.train()):
        model(ids, mask, labels=labels).loss.backward()
    theirs = dict(ref.named_parameters())
    assert mine.roberta.embeddings.position.weight.grad[1].abs().max() == 0  # pad_token_id's row
    for name, param in mine.named_parameters():
        close(param.grad, theirs[checkpoint_key(name, "roberta.")].grad)


def test_float_4d_mask_on_a_bfloat16_model_with_attention_maps(tmp_path):
    """An additive mask the caller built in fp32 is cast to the model's dtype (the explicit-softmax
    path adds it to bf16 scores)."""
    ref, _ = load_pair(tmp_path, "RobertaModel")
    mine = ours.RobertaModel.from_pretrained(tmp_path / "RobertaModel", dtype=torch.bfloat16)
    ids, mask, _ = padded_batch(LENGTHS)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # (B, 1, 1, T)
    with torch.no_grad():
        expected = ref(ids, mask).last_hidden_state
        got = mine(ids, additive.expand(-1, 1, ids.shape[1], -1), output_attentions=True).last_hidden_state.float()
    real = mask.bool()
    assert (got - expected)[real].abs().max() < 0.1 * expected[real].abs().max()  # bf16, same function


def test_dropout_follows_train_and_eval(tmp_path):
    _, mine = load_pair(tmp_path, "RobertaModel")
    ids, mask, _ = padded_batch(LENGTHS)
    with torch.no_grad():
        assert torch.equal(mine(ids, mask).last_hidden_state, mine(ids, mask).last_hidden_state)
        mine.train()
        assert not torch.equal(mine(ids, mask).last_hidden_state, mine(ids, mask).last_hidden_state)


def test_sentence_embedding_pooling(tmp_path):
    ref, mine = load_pair(tmp_path, "RobertaModel")
    ids, mask, _ = padded_batch(LENGTHS)
    with torch.no_grad():
        expected = ref(ids, mask)
        out = mine(ids, mask)
    m = mask[..., None].float()
    close(ours.sentence_embedding(out, mask, "mean"), (expected.last_hidden_state * m).sum(1) / m.sum(1))
    close(ours.sentence_embedding(out, mask, "cls"), expected.last_hidden_state[:, 0])
    close(ours.sentence_embedding(out, mask, "pooler"), expected.pooler_output)
    normed = ours.sentence_embedding(out, mask, "mean", normalize=True)
    close(normed.norm(dim=-1), torch.ones(len(LENGTHS)))
    with pytest.raises(ValueError, match="unknown pooling"):
        ours.sentence_embedding(out, mask, "max")


def test_packed_rows_with_block_diagonal_mask_equal_separate_rows(tmp_path):
    """The padding-free hook: two sequences packed into one row, a 4-D block-diagonal mask and
    per-sequence position ids give the same states as running each sequence alone."""
    ref, mine = load_pair(tmp_path, "RobertaModel")
    a, _, _ = padded_batch([6], seed=1)
    b, _, _ = padded_batch([9], seed=2)
    packed = torch.cat([a, b], dim=1)  # (1, 15)
    segment = torch.tensor([0] * 6 + [1] * 9)
    block = (segment[:, None] == segment[None, :])[None, None]  # (1, 1, 15, 15) True = attend
    positions = torch.cat([torch.arange(6), torch.arange(9)])[None] + 2  # RoBERTa positions start at pad+1
    with torch.no_grad():
        together = mine(packed, block, position_ids=positions).last_hidden_state[0]
        close(together[:6], ref(a).last_hidden_state[0])
        close(together[6:], ref(b).last_hidden_state[0])


@pytest.mark.parametrize("is_decoder", [False, True])
def test_lengths_run_the_layers_on_real_tokens_only(tmp_path, unpadded_on_cpu, is_decoder):
    """With each row's length the layers run packed (`Ragged`): the reference's states at the real
    tokens, zeros at the pads, in every hidden state and the pooler."""
    ref, mine = load_pair(tmp_path, "RobertaModel", is_decoder=is_decoder)
    ids, mask, _ = padded_batch(LENGTHS)
    real = mask.bool()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = mine(ids, mask, lengths=LENGTHS, output_hidden_states=True)
    close(got.pooler_output, expected.pooler_output)
    assert len(got.hidden_states) == len(expected.hidden_states)
    for a, b in zip((got.last_hidden_state, *got.hidden_states), (expected.last_hidden_state, *expected.hidden_states)):
        close(a[real], b[real])
        assert not a[~real].any()
    assert got.past_key_values is None  # no cache for packed rows, even for a decoder


def test_hidden_at_with_lengths_equals_the_reference_there(tmp_path, unpadded_on_cpu):
    ref, mine = load_pair(tmp_path, "RobertaModel")
    ids, mask, _ = padded_batch(LENGTHS)
    index = torch.tensor([[0, 3], [2, 3], [11, 0], [1, 0]])  # (B, n), real tokens only
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = mine.hidden_at(ids, mask, index, LENGTHS)
    close(got, expected.gather(1, index[..., None].expand(-1, -1, expected.shape[-1])))


def test_lengths_change_nothing_on_a_cpu_by_default(tmp_path):
    _, mine = load_pair(tmp_path, "RobertaModel")
    ids, mask, _ = padded_batch(LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(mine(ids, mask, lengths=LENGTHS).last_hidden_state, mine(ids, mask).last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("unsupported", [dict(output_attentions=True), dict(head_mask=torch.ones(2)), dict(use_cache=True)])
def test_lengths_refuse_what_packed_rows_cannot_give(tmp_path, unsupported):
    _, mine = load_pair(tmp_path, "RobertaModel", is_decoder=True)
    ids, mask, _ = padded_batch(LENGTHS)
    name = next(iter(unsupported)) + ("=True" if "use_cache" in unsupported else "")
    with pytest.raises(ValueError, match=f"does not combine with {name}"):
        mine(ids, mask, lengths=LENGTHS, **unsupported)


def test_lengths_are_for_inference(tmp_path):
    """Packed attention has no dropout: a model in training mode is refused rather than trained without it."""
    _, mine = load_pair(tmp_path, "RobertaModel")
    ids, mask, _ = padded_batch(LENGTHS)
    mine.train()
    with pytest.raises(ValueError, match=r"does not combine with training mode \(attention dropout\)"):
        mine(ids, mask, lengths=LENGTHS)
    with pytest.raises(ValueError, match="training mode"):
        mine.hidden_at(ids, mask, torch.zeros(len(ids), 1, dtype=torch.long), LENGTHS)


def test_lengths_need_the_attention_mask_they_describe(tmp_path):
    _, mine = load_pair(tmp_path, "RobertaModel")
    ids, mask, _ = padded_batch(LENGTHS)
    block = torch.ones(len(ids), 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    for call in (lambda: mine(ids, lengths=LENGTHS), lambda: mine(ids, block, lengths=LENGTHS),
                 lambda: mine.hidden_at(ids, None, torch.zeros(len(ids), 1, dtype=torch.long), LENGTHS)):  # fmt: skip
        with pytest.raises(ValueError, match=r"lengths needs the \(B, T\) attention_mask"):
            call()


def flash_varlen_contract(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size):
    """FlashAttention's variable-length attention as torch.nn.attention.varlen documents it, row by
    row with SDPA: row b's queries q[cu_seq_q[b]:cu_seq_q[b + 1]] attend to its keys only; window
    (-1, 0) hides the keys after each query, aligned to the row's last key."""
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and q.dim() == k.dim() == v.dim() == 3
    q_lengths, k_lengths = cu_seq_q.diff().tolist(), cu_seq_k.diff().tolist()
    assert (max_q, max_k) == (max(q_lengths), max(k_lengths)) and window_size in ((-1, -1), (-1, 0))
    rows = []
    for qb, kb, vb in zip(q.split(q_lengths), k.split(k_lengths), v.split(k_lengths)):
        Lq, Lk = len(qb), len(kb)
        allowed = torch.ones(Lq, Lk, dtype=torch.bool)
        if window_size == (-1, 0):
            allowed = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + Lk - Lq
        y = F.scaled_dot_product_attention(qb.transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1), attn_mask=allowed)
        rows.append(y.transpose(0, 1))  # (Lq, nh, hs)
    return torch.cat(rows)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_flash_branch_passes_the_kernel_each_rows_queries_and_keys(tmp_path, unpadded_on_cpu, monkeypatch, is_decoder):
    """The kernel itself needs a GPU (next test); here the model's call of it runs against the
    kernel's documented contract, so the packed layouts it is given (hidden_at's queries apart from
    its keys, a decoder's window) are checked against transformers on this CPU."""
    monkeypatch.setattr(ours.roberta, "varlen_attn", flash_varlen_contract)
    monkeypatch.setattr(ours.roberta, "flash_varlen_runs", lambda q: True)
    ref, mine = load_pair(tmp_path, "RobertaModel", is_decoder=is_decoder)
    ids, mask, _ = padded_batch(LENGTHS)
    real = mask.bool()
    index = torch.tensor([[0, 3], [2, 3], [11, 0], [1, 0]])  # (B, n), real tokens only
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        close(mine(ids, mask, lengths=LENGTHS).last_hidden_state[real], expected[real])
        close(mine.hidden_at(ids, mask, index, LENGTHS), expected.gather(1, index[..., None].expand(-1, -1, expected.shape[-1])))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("is_decoder", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_variable_length_attention_on_a_gpu(tmp_path, is_decoder, dtype):
    """On a GPU at half precision `lengths` runs FlashAttention's variable-length kernel, and its
    states at the real tokens stay as close to fp32's as the padded layers' (SDPA with the mask)."""
    assert ours.roberta.varlen_attn is not None, "this torch has no torch.nn.attention.varlen with window_size (torch >= 2.11)"
    _, mine = load_pair(tmp_path, "RobertaModel", is_decoder=is_decoder, hidden_size=64, num_attention_heads=2,
                        max_position_embeddings=130)  # fmt: skip
    lengths = [37, 5, 120, 64, 2]
    ids, mask, _ = (t.cuda() for t in padded_batch(lengths))
    index = torch.tensor([[0, n - 1] for n in lengths], device="cuda")  # (B, 2): each row's first and last token
    real = mask.bool()
    with torch.no_grad():
        exact = mine.cuda()(ids, mask).last_hidden_state  # fp32
        half = mine.to(dtype)
        padded = half(ids, mask).last_hidden_state
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            packed = half(ids, mask, lengths=lengths).last_hidden_state
            at = half.hidden_at(ids, mask, index, lengths)
    # FlashAttention's kernel ran for every layer: both calls' (a decoder's hidden_at runs padded)
    flash_calls = sum(event.count for event in profile.key_averages() if "flash_attention_forward" in event.key)
    assert flash_calls >= mine.config.num_hidden_layers * (1 if is_decoder else 2)
    tolerance = 2 * (padded[real].float() - exact[real]).abs().max().item()
    close(packed[real].float(), exact[real], atol=tolerance)
    if not is_decoder:  # a decoder's hidden_at runs padded (its docstring)
        close(at.float(), exact.gather(1, index[..., None].expand(-1, -1, exact.shape[-1])), atol=tolerance)
