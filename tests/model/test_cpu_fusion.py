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
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_fused_linear_equals_linear_and_activation(activation, dtype, atol):
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
    assert (block.mlp_up.activation, isinstance(block.act, torch.nn.Identity)) == (("gelu", True) if hidden_act == "gelu" else (None, False))
    # The same parameters, shared rather than copied: checkpoints save and load as before.
    assert {k: v.data_ptr() for k, v in mine.state_dict().items()} == before
    ids, mask, _ = padded_batch([9, 4, 12, 2])
    first = torch.zeros(len(ids), 1, dtype=torch.long)
    with torch.inference_mode():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(mine(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.classifier(mine.roberta.hidden_at(ids, mask, first)), expected, atol=1e-5, rtol=0)


def test_models_oneDNN_cannot_run_are_left_alone():
    config = ours.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    with torch.device("meta"):  # not on the CPU (as a GPU model is not)
        elsewhere = ours.RobertaModel(config)
    assert not isinstance(fuse_linear_layers(elsewhere).layers[0].mlp_up, FusedLinear)
    half = ours.RobertaModel(config).half()  # fp16 runs only on CPUs with AVX-512 FP16 (not this repo's)
    assert isinstance(fuse_linear_layers(half).layers[0].mlp_up, FusedLinear) == onednn_runs(torch.float16)
