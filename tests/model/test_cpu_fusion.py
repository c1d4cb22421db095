"""model/cpu_fusion.py: the fused oneDNN Linear layers against torch's nn.Linear and activations,
and a fused model against transformers (the reference)."""

import pytest
import torch
import torch.nn.functional as F

import model as ours
from model.cpu_fusion import ONEDNN_ACTIVATIONS, FusedLinear, fuse_linear_layers, onednn_runs
from model.roberta import ACT_FNS
from tests.checkpoints import padded_batch, reference, save

pytestmark = pytest.mark.skipif(not onednn_runs(torch.float32), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("activation", [None, *ONEDNN_ACTIVATIONS])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_fused_linear_equals_linear_and_activation(activation, dtype, atol):
    if not onednn_runs(dtype):
        pytest.skip(f"oneDNN cannot run {dtype} on this CPU (fuse_linear_layers leaves such models alone)")
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80).to(dtype)
    fused = FusedLinear(linear, activation)
    act = ACT_FNS[activation] if activation else (lambda y: y)
    x = torch.randn(3, 7, 48, dtype=dtype)
    strided = torch.randn(5, 9, 48, dtype=dtype)[:, 2]  # (5, 48), rows 9 * 48 apart: a head reading <s>
    with torch.inference_mode():
        for inputs in (x, strided):
            expected = act(F.linear(inputs.float(), linear.weight.float(), linear.bias.float()))
            torch.testing.assert_close(fused(inputs).float(), expected, atol=atol, rtol=0)


def test_fused_linear_trains_like_linear():
    """oneDNN's op has no backward: with gradients on, the layer must take torch's path."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24)
    fused = FusedLinear(torch.nn.Linear(16, 24), "gelu")
    fused.load_state_dict(linear.state_dict())
    x = torch.randn(4, 16)
    F.gelu(linear(x)).square().sum().backward()
    fused(x).square().sum().backward()
    torch.testing.assert_close(fused.weight.grad, linear.weight.grad)
    torch.testing.assert_close(fused.bias.grad, linear.bias.grad)


@pytest.mark.parametrize("hidden_act", ["gelu", "silu"])  # fused into the MLP's first layer, and not
def test_fused_model_matches_reference(tmp_path, hidden_act):
    ref = reference("RobertaForSequenceClassification", hidden_act=hidden_act)
    mine = ours.RobertaForSequenceClassification.from_pretrained(save(ref, tmp_path / "ckpt"))
    before = {k: v.data_ptr() for k, v in mine.state_dict().items()}
    fuse_linear_layers(mine)
    block = mine.roberta.layers[0]
    fused = [block.attention.query, block.attention.key, block.attention.value, block.attention.out, block.mlp_up, block.mlp_down]
    assert all(isinstance(m, FusedLinear) for m in fused)
    assert block.mlp_up.activation == (hidden_act if hidden_act == "gelu" else None)
    assert isinstance(block.act, torch.nn.Identity) == (hidden_act == "gelu")
    # The same parameters, shared rather than copied: checkpoints save and load as before.
    assert {k: v.data_ptr() for k, v in mine.state_dict().items()} == before
    ids, mask, _ = padded_batch([9, 4, 12, 2])
    first = torch.zeros(len(ids), 1, dtype=torch.long)
    with torch.inference_mode():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(mine(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.classifier(mine.roberta.hidden_at(ids, mask, first)), expected, atol=1e-5, rtol=0)


def test_fused_decoder_with_cross_attention_and_cache_matches_reference(tmp_path):
    ref = reference("RobertaForCausalLM", is_decoder=True, add_cross_attention=True)
    mine = fuse_linear_layers(ours.RobertaForCausalLM.from_pretrained(save(ref, tmp_path / "ckpt")))
    assert isinstance(mine.roberta.layers[0].crossattention.key, FusedLinear)
    ids, mask, _ = padded_batch([8, 8])
    kw = dict(encoder_hidden_states=torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)),
              encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))  # fmt: skip
    with torch.inference_mode():
        expected = ref(ids, mask, **kw).logits
        torch.testing.assert_close(mine(ids, mask, **kw).logits, expected, atol=1e-5, rtol=0)
        out = mine(ids[:, :5], mask[:, :5], **kw, use_cache=True)  # then token by token from the cache
        last = mine(ids[:, 5:6], mask[:, :6], **kw, past_key_values=out.past_key_values).logits
    torch.testing.assert_close(last, expected[:, 5:6], atol=1e-5, rtol=0)


def test_a_fused_model_cast_afterwards_still_computes(tmp_path):
    """The fast path runs only at the dtype (and on the device) checked when fusing: fp64 has no
    oneDNN primitive, so the cast model takes torch's path."""
    ref = reference("RobertaModel")
    ids, mask, _ = padded_batch([9, 4])
    with torch.inference_mode():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    mine = fuse_linear_layers(ours.RobertaModel.from_pretrained(save(ref, tmp_path / "ckpt"))).double()
    with torch.inference_mode():
        torch.testing.assert_close(mine(ids, mask).last_hidden_state, expected.double(), atol=1e-5, rtol=0)


def test_models_onednn_cannot_run_are_left_alone():
    config = ours.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    with torch.device("meta"):  # not on the CPU (as a GPU model is not)
        elsewhere = ours.RobertaModel(config)
    assert not isinstance(fuse_linear_layers(elsewhere).layers[0].mlp_up, FusedLinear)
    half = ours.RobertaModel(config).half()  # fp16 runs only on CPUs with AVX-512 FP16 (not this repo's)
    assert isinstance(fuse_linear_layers(half).layers[0].mlp_up, FusedLinear) == onednn_runs(torch.float16)
