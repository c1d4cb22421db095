"""The RoBERTa encoder family in one file: embeddings, blocks, heads, losses.

Reference semantics: transformers' `modeling_roberta.py` (`RobertaModel`, `RobertaForMaskedLM`,
`RobertaForCausalLM`, `RobertaForSequenceClassification`), matched to 1e-4 in fp32 by
tests/model/test_roberta.py. BERT checkpoints (`model_type: bert`) run through the same classes:
only the key prefix, the first position id (0 instead of pad+1) and the tokenizer differ.

Deliberate differences from the reference, all documented where they live:
- `past_key_values` is the legacy tuple format: one `(k, v)` (or `(k, v, cross_k, cross_v)`) per
  layer, each `(B, nh, S, hs)`, not a `Cache` object.
- `head_mask` (dropped by transformers 5) is kept with transformers 4 semantics: it scales each
  head's attention probabilities, in self- and cross-attention alike.
- The config is frozen: the sequence-classification loss infers `problem_type` without writing it
  back to the config.
- `attention_mask` may also be 4-D `(B, 1, T, S)` (bool: True = attend, or additive float). With
  explicit `position_ids` this packs several sequences into one row (block-diagonal mask), and the
  heads take `positions` so the LM head runs only where a caller needs logits.
- `RobertaModel.hidden_at` (an addition) gives the last hidden state at a few positions per row,
  with the last layer computed only there: the inference path of classify and pseudo-LL.
- `lengths` (an addition to `RobertaModel.forward` and `hidden_at`): each right-padded row's
  real-token count, on the host. On a GPU (`UNPADDED_DEVICES`) the layers then run on the real
  tokens only, packed row after row (`Ragged`), with variable-length attention (`PackedAttention`);
  pad positions of the returned `last_hidden_state` then hold zeros instead of the reference's values.

Shapes: B batch, T query length, S key length (past + T), H hidden, nh heads, hs head size, V vocab.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.config import RobertaConfig

try:  # FlashAttention over packed rows of different lengths (CUDA, fp16/bf16)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None
if varlen_attn is not None and "window_size" not in inspect.signature(varlen_attn).parameters:
    varlen_attn = None  # torch 2.10's took is_causal; since 2.11 causality is window_size=(-1, 0)

# Devices where `lengths` makes the layers skip the pads. Not the CPU: with no variable-length
# kernel there, attention pads each layer's queries, keys and values back for SDPA, which costs
# about what skipping 3% of padding saves. Measured on this repo's 2-core CPU with
# `python -m jobs.benchmark --compare-layers --repeats 3 --skip-e2e` (model stage, rounds
# interleaved, padded against unpadded, tokens/s): classify small fp32 1,000 rows 7,908 / 7,360 /
# 7,392 against 7,914 / 7,308 / 7,397; bf16 11,226 / 11,189 / 12,576 against 11,084 / 11,131 /
# 12,518; score-pseudo bf16 60 rows 284 / 285 / 284 against 282 / 281 / 284.
UNPADDED_DEVICES = {"cuda"}

ACT_FNS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "mish": F.mish,
}


# ----------------------------------------------------------------------------- outputs
class ModelOutput(Mapping):
    """Like transformers' ModelOutput: attributes, and a mapping of the fields that are not None
    (`out["logits"]`, `"loss" in out`, `out.items()`, `**out`; a None field is a KeyError), plus
    `out[i]` and `to_tuple()` over the same fields in order (so `return_dict=False` is `out.to_tuple()`)."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.keys())

    def __getitem__(self, key):
        if not isinstance(key, str):
            return self.to_tuple()[key]
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key) -> bool:  # names only, as a dict's keys (Mapping's would try out[0])
        return key in self.keys()

    def __len__(self) -> int:
        return len(self.keys())


def returned(output: ModelOutput, return_dict: bool | None):
    """transformers' rule: the output object unless return_dict is False (None means the default)."""
    return output if return_dict is None or return_dict else output.to_tuple()


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # (B, T, H)
    pooler_output: torch.Tensor | None = None  # (B, H)
    # The cache comes before the hidden states in the tuple form, as transformers returns them.
    past_key_values: tuple | None = None
    hidden_states: tuple | None = None  # L+1 of (B, T, H): embeddings, then each layer
    attentions: tuple | None = None  # L of (B, nh, T, S)
    cross_attentions: tuple | None = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V)
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V)
    past_key_values: tuple | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    cross_attentions: tuple | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, num_labels)
    hidden_states: tuple | None = None
    attentions: tuple | None = None


# ----------------------------------------------------------------------------- modules
class Embeddings(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        # RoBERTa gives pads the position pad_token_id, a row that gets no gradient (BERT has none).
        padding_position = config.pad_token_id if config.position_offset else None
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size, padding_idx=padding_position)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def position_ids(self, input_ids, inputs_embeds, past_length: int) -> torch.Tensor:
        """(B, T) position ids. RoBERTa counts only non-pad tokens, from pad+1, and gives pads the
        pad position (fairseq's make_positions): `cumsum(mask) * mask + padding_idx`."""
        offset = self.config.position_offset
        if offset == 0:  # BERT: plain 0..T-1 after the cached prefix
            B, T = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape
            device = (input_ids if input_ids is not None else inputs_embeds).device
            return torch.arange(past_length, past_length + T, device=device).expand(B, T)
        if input_ids is None:  # embeddings give no padding to see: sequential, as the reference does
            B, T = inputs_embeds.shape[:2]
            return torch.arange(offset, offset + T, device=inputs_embeds.device).expand(B, T)
        mask = input_ids.ne(self.config.pad_token_id).int()
        return ((torch.cumsum(mask, dim=1) + past_length) * mask).long() + self.config.pad_token_id

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds, past_length: int):
        if position_ids is None:
            position_ids = self.position_ids(input_ids, inputs_embeds, past_length)
        if inputs_embeds is None:
            inputs_embeds = self.word(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        x = inputs_embeds + self.token_type(token_type_ids) + self.position(position_ids)
        return self.dropout(self.norm(x))  # (B, T, H)


class Attention(nn.Module):
    """Multi-head attention followed by the post-LayerNorm residual (`norm(x + out(attn(x)))`).
    Self-attention when `kv_input` is None, cross-attention over `kv_input` otherwise."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        H = config.hidden_size
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        self.query, self.key, self.value = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.out = nn.Linear(H, H)
        self.norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.attn_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def heads(self, x):  # (B, T, H) -> (B, nh, T, hs)
        return x.view(*x.shape[:2], self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x, bias, kv_input=None, past=None, head_mask=None, output_attentions=False, packed=None):
        """x (B, T, H); bias (B, 1, T, S) additive or None; past: cached (k, v) of this attention.
        Returns (output (B, T, H), (k, v) for the cache, probabilities (B, nh, T, S) or None).
        With `packed` (a PackedAttention), x is (Nq, H) and kv_input (Nk, H): rows packed token after
        token; there is no cache and no probabilities then."""
        if packed is not None:
            source = x if kv_input is None else kv_input
            q, k, v = (t.view(len(t), self.n_head, self.head_dim) for t in (self.query(x), self.key(source), self.value(source)))
            y = packed(q, k, v).reshape(x.shape)  # (Nq, nh, hs) -> (Nq, H)
            return self.norm(x + self.dropout(self.out(y))), None, None
        q = self.heads(self.query(x))
        if kv_input is not None and past is not None:  # cross-attention: encoder k/v computed once
            k, v = past
        else:
            source = x if kv_input is None else kv_input
            k, v = self.heads(self.key(source)), self.heads(self.value(source))
            if past is not None:  # self-attention decoding: append to the cached prefix
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        dropout = self.attn_dropout if self.training else 0.0
        if output_attentions or head_mask is not None:
            # Explicit softmax only when the probabilities themselves are needed.
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + (0 if bias is None else bias), -1)
            probs = F.dropout(probs, dropout, self.training)
            if head_mask is not None:
                probs = probs * head_mask  # (1, nh, 1, 1)
            y = probs @ v
        else:
            probs = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(x.shape)  # (B, nh, T, hs) -> (B, T, H)
        return self.norm(x + self.dropout(self.out(y))), (k, v), (probs if output_attentions else None)


class Block(nn.Module):
    """Post-LayerNorm transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.attention = Attention(config)
        self.crossattention = Attention(config) if config.add_cross_attention else None
        self.mlp_up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.mlp_down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACT_FNS[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, bias, encoder_states=None, encoder_bias=None, past=None, head_mask=None, output_attentions=False,
                packed=None):  # fmt: skip
        """x (B, T, H), or (N, H) packed rows (`packed`); bias (B|1, 1, T|1, S) additive or None;
        encoder_states (B, S_enc, H) and encoder_bias for cross-attention; past: this layer's cache,
        (k, v) or (k, v, cross k, cross v), each (B, nh, S, hs). Returns (x like the input, the new
        cache, self-attention probabilities or None, cross-attention probabilities or None)."""
        self_past, cross_past = (past[:2], past[2:] or None) if past is not None else (None, None)
        x, present, attn = self.attention(x, bias, None, self_past, head_mask, output_attentions, packed)
        cross = None
        if encoder_states is not None:
            if self.crossattention is None:
                raise ValueError("encoder_hidden_states given, but the config has add_cross_attention=false")
            x, cross_kv, cross = self.crossattention(x, encoder_bias, encoder_states, cross_past, head_mask, output_attentions)
            present = present + cross_kv
        return self.feed_forward(x), present, attn, cross

    def feed_forward(self, x):  # (B, T, H) -> (B, T, H): the MLP and its post-LayerNorm residual
        # For CPU inference model.cpu_fusion may fuse `act` into `mlp_up` (and make `act` the identity).
        return self.mlp_norm(x + self.dropout(self.mlp_down(self.act(self.mlp_up(x)))))


def attention_bias(mask, T: int, S: int, causal: bool, dtype, device) -> torch.Tensor | None:
    """Additive attention bias (B|1, 1, T, S): 0 where a query may attend, the dtype's min elsewhere.

    mask: None, (B, S) with 1 = real token (keys only; padded query rows still compute, as in the
    reference), or a 4-D (B, 1, T, S) mask given by the caller (bool: True = attend; float: additive).
    causal: the T queries are the last T of the S positions and see only keys up to themselves."""
    if mask is not None and mask.dim() == 4:
        return mask.to(dtype) if mask.is_floating_point() else torch.zeros((), dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    allowed = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, S)
    if causal:
        rows = torch.arange(S - T, S, device=device)[:, None]
        tril = rows >= torch.arange(S, device=device)[None, :]  # (T, S)
        allowed = tril[None, None] if allowed is None else allowed & tril
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """A host array on `device`. To a GPU it goes from pinned memory, so the copy is asynchronous:
    the host queues it behind the work already queued instead of waiting for the GPU to finish."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass(frozen=True)
class Ragged:
    """B rows of different lengths packed one after another: N real tokens in place of a
    right-padded (B, T) layout. Built on the host from the row lengths (`from_lengths`): finding the
    real tokens on the device (`mask.nonzero()`) would make the host wait for a GPU at every batch."""

    index: torch.Tensor  # (N,) long: each token's position in the flattened (B * T) layout
    cu_seqlens: torch.Tensor  # (B + 1,) int32: where each row starts among the N tokens, then N
    max_seqlen: int  # the longest row
    rows: int  # B
    width: int  # T

    @classmethod
    def from_lengths(cls, lengths, width: int, device) -> Ragged:
        """lengths: (B,) real tokens per row, each <= width, as a list or numpy array (host)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        index = np.flatnonzero(np.arange(width)[None, :] < lengths[:, None])
        cu_seqlens = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return cls(to_device(index, device), to_device(cu_seqlens, device), int(lengths.max(initial=0)), len(lengths), width)

    def pack(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (N, ...)
        return x.reshape(self.rows * self.width, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (B, T, ...), zeros at the pads
        padded = x.new_zeros(self.rows * self.width, *x.shape[1:]).index_copy_(0, self.index, x)
        return padded.view(self.rows, self.width, *x.shape[1:])


def flash_varlen_runs(q: torch.Tensor) -> bool:
    """Whether FlashAttention's variable-length kernel takes q (Nq, nh, hs): torch >= 2.11, fp16 or
    bf16, an NVIDIA GPU of compute capability 8.0 (Ampere) or newer, hs a multiple of 8 up to 256."""
    return (
        varlen_attn is not None
        and q.is_cuda
        and torch.version.cuda is not None
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
    )


@dataclass(frozen=True)
class PackedAttention:
    """Attention between packed rows: row b's queries (of `queries`) see only row b's keys (of
    `keys`); `causal`: each row's queries are its keys' positions and see only the earlier ones.

    Where FlashAttention's variable-length kernel runs (`flash_varlen_runs`: fp16/bf16 on an
    Ampere or newer GPU), it takes the packed tokens as they are. Otherwise (fp32, an older GPU,
    torch < 2.11, a CPU) queries, keys and values are padded back for SDPA with the padded layout's
    `bias`; the other layers still skip the pads."""

    queries: Ragged
    keys: Ragged
    bias: torch.Tensor | None  # (B, 1, Tq | 1, Tk) additive, for the padded fallback
    causal: bool

    def __call__(self, q, k, v):  # q (Nq, nh, hs), k and v (Nk, nh, hs) -> (Nq, nh, hs)
        if flash_varlen_runs(q):
            q_rows, k_rows = self.queries, self.keys
            window = (-1, 0) if self.causal else (-1, -1)  # (-1, 0): no key after the query
            return varlen_attn(q, k, v, q_rows.cu_seqlens, k_rows.cu_seqlens, q_rows.max_seqlen, k_rows.max_seqlen, window_size=window)
        q, k, v = (rows.pad(t).transpose(1, 2) for rows, t in ((self.queries, q), (self.keys, k), (self.keys, v)))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)  # (B, nh, Tq, hs)
        return self.queries.pack(y.transpose(1, 2))


def pack_rows(x: torch.Tensor, lengths, bias, causal: bool) -> tuple[torch.Tensor, PackedAttention | None]:
    """x (B, T, H) packed to its real tokens (N, H), with the attention over those rows, where the
    layers skip the pads (`lengths` given, the device in UNPADDED_DEVICES); else (x, None)."""
    if lengths is None or x.device.type not in UNPADDED_DEVICES:
        return x, None
    rows = Ragged.from_lengths(lengths, x.shape[1], x.device)
    return rows.pack(x), PackedAttention(rows, rows, bias, causal)


@torch.no_grad()
def init_weights(module: nn.Module, config: RobertaConfig) -> None:
    """transformers' `_init_weights` for a model built from a config: Linear and Embedding weights
    N(0, initializer_range), Linear biases and embedding padding rows 0 (LayerNorms and the LM bias
    start at 1 and 0 already). `from_pretrained` builds on the meta device, where this costs nothing."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight[m.padding_idx].zero_()


class PreTrained(nn.Module):
    """What every class shares: construction from a checkpoint directory and saving to one."""

    base_model_prefix = "roberta"

    @classmethod
    def from_pretrained(cls, local_dir: str | Path, dtype: torch.dtype | str | None = None, device=None, **kwargs):
        """Load a Hugging Face checkpoint directory (safetensors only; see model/loading.py)."""
        from model.loading import load_pretrained

        return load_pretrained(cls, local_dir, dtype=dtype, device=device, **kwargs)

    def save_pretrained(self, local_dir: str | Path) -> None:
        """Write config.json + model.safetensors with the Hugging Face key names."""
        from model.loading import save_pretrained

        save_pretrained(self, local_dir)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class RobertaModel(PreTrained):
    def __init__(self, config: RobertaConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        init_weights(self, config)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        *,
        lengths=None,
    ):
        """lengths: each row's real-token count (host ints) for the right-padded rows that
        attention_mask (B, T) describes: on UNPADDED_DEVICES the layers then run on the real tokens
        only (see `Ragged`). Not with a cache, cross-attention, head_mask or attention maps;
        use_cache left at None means no cache then."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        config = self.config
        if not config.is_decoder:  # as in transformers: an encoder has no cross-attention and ignores these
            encoder_hidden_states = encoder_attention_mask = None
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if lengths is not None:
            self.check_unpadded(attention_mask, head_mask, encoder_hidden_states, past_key_values, use_cache, output_attentions,
                                self.training)  # fmt: skip
            use_cache = False
        use_cache = (config.use_cache if use_cache is None else use_cache) and config.is_decoder
        past_length = past_key_values[0][0].shape[2] if past_key_values else 0

        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, past_length)  # (B, T, H)
        T = x.shape[1]
        bias = attention_bias(attention_mask, T, past_length + T, config.is_decoder, x.dtype, x.device)
        encoder_bias = None
        if encoder_hidden_states is not None and encoder_attention_mask is not None:
            encoder_bias = attention_bias(encoder_attention_mask, T, encoder_hidden_states.shape[1], False, x.dtype, x.device)
        head_masks = self.head_masks(head_mask, x.dtype)
        x, packed = pack_rows(x, lengths, bias, config.is_decoder)
        padded = packed.queries.pad if packed is not None else lambda h: h  # the layers' states as returned: (B, T, H)

        hidden_states, attentions, cross_attentions, presents = [x], [], [], []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            x, present, attn, cross = layer(
                x, bias, encoder_hidden_states, encoder_bias, past, head_masks[i], output_attentions, packed
            )
            hidden_states.append(x)
            attentions.append(attn)
            cross_attentions.append(cross)
            presents.append(present)

        x = padded(x)
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=x,
            pooler_output=torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None,
            hidden_states=tuple(map(padded, hidden_states[:-1])) + (x,) if output_hidden_states else None,
            past_key_values=tuple(presents) if use_cache else None,
            attentions=tuple(attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions and encoder_hidden_states is not None else None,
        )
        return returned(out, return_dict)

    def hidden_at(self, input_ids, attention_mask, index, lengths=None) -> torch.Tensor:
        """The last hidden state at `index` only: input_ids, attention_mask (B, T), index (B, n)
        positions -> (B, n, H), equal to `forward(...).last_hidden_state` gathered at `index`.
        lengths: as in `forward`, and then `index` must point at real tokens (a row with none has
        none to point at). A decoder runs padded: its kept queries are not its rows' last tokens,
        which the variable-length kernel's causal mode assumes.

        The inference path for callers whose head reads a few positions per row (classify: <s>;
        pseudo-log-likelihood: the masked token). The last layer computes keys and values at every
        position, but queries, attention, output projection and MLP only at `index`: per token it keeps
        4 H^2 of the layer's 8 H^2 + 4 H I weight FLOPs and drops its attention, so a 6-layer encoder
        with I = 4 H does 20 of its 144 H^2 weight FLOPs per token less (14%)."""
        x = self.embeddings(input_ids, None, None, None, 0)  # (B, T, H)
        (B, T), n = input_ids.shape, index.shape[1]
        causal = self.config.is_decoder
        bias = attention_bias(attention_mask, T, T, causal, x.dtype, x.device)  # (B|1, 1, T|1, T)
        if lengths is not None:
            self.check_unpadded(attention_mask, training=self.training)
        x, packed = pack_rows(x, None if causal else lengths, bias, False)
        for layer in self.layers[:-1]:
            x = layer(x, bias, packed=packed)[0]
        if packed is not None:  # the n queries of each row, packed: (B * n, H)
            rows = packed.keys
            queries = x.index_select(0, (index + rows.cu_seqlens[:-1, None]).reshape(-1))
            packed = PackedAttention(Ragged.from_lengths(np.full(B, n), n, x.device), rows, bias, False)
        else:
            if bias is not None and bias.shape[2] > 1:  # causal: keep the bias rows of the kept queries
                bias = bias.expand(B, 1, T, T).gather(2, index[:, None, :, None].expand(-1, 1, -1, T))
            queries = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # (B, n, H)
        last = self.layers[-1]
        return last.feed_forward(last.attention(queries, bias, kv_input=x, packed=packed)[0]).view(B, n, -1)

    @staticmethod
    def check_unpadded(attention_mask, head_mask=None, encoder_hidden_states=None, past_key_values=None, use_cache=None,
                       output_attentions=False, training=False):  # fmt: skip
        """`lengths` runs the self-attention of plain right-padded rows only, for inference (its
        packed attention has no dropout)."""
        if attention_mask is None or attention_mask.dim() != 2:
            raise ValueError("lengths needs the (B, T) attention_mask of the same right-padded rows: its fallback attention masks with it")
        unsupported = {
            "head_mask": head_mask is not None,
            "encoder_hidden_states": encoder_hidden_states is not None,
            "past_key_values": bool(past_key_values),
            "use_cache=True": bool(use_cache),
            "output_attentions": output_attentions,
            "training mode (attention dropout)": training,
        }
        if any(unsupported.values()):
            given = ", ".join(name for name, present in unsupported.items() if present)
            raise ValueError(f"lengths (unpadded layers) does not combine with {given}; leave lengths out to use them")

    def head_masks(self, head_mask, dtype) -> list:
        """(nh,) or (L, nh) head mask -> one (1, nh, 1, 1) multiplier per layer (or Nones)."""
        L = self.config.num_hidden_layers
        if head_mask is None:
            return [None] * L
        head_mask = head_mask.to(dtype)
        if head_mask.dim() == 1:
            head_mask = head_mask.expand(L, -1)
        return [m[None, :, None, None] for m in head_mask]


POOLINGS = ("mean", "cls", "pooler")


def sentence_embedding(output, attention_mask, pooling: str = "mean", normalize: bool = False) -> torch.Tensor:
    """(B, H) sentence vectors from a base-model output.

    pooling: "mean" averages the real tokens (attention_mask 1), "cls" takes the first token,
    "pooler" takes the pooler output (dense + tanh on the first token). normalize: L2 to unit length."""
    h = output.last_hidden_state  # (B, T, H)
    if pooling == "mean":
        if attention_mask is None:
            raise ValueError("pooling='mean' needs the (B, T) attention_mask: it averages the real tokens only")
        m = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    elif pooling == "cls":
        e = h[:, 0]
    elif pooling == "pooler":
        if output.pooler_output is None:
            raise ValueError("pooling='pooler' needs a model built with its pooling layer (add_pooling_layer=True)")
        e = output.pooler_output
    else:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    return F.normalize(e, p=2, dim=-1) if normalize else e


# ----------------------------------------------------------------------------- heads
class LMHead(nn.Module):
    """dense -> gelu -> LayerNorm -> decoder (tied to the word embeddings unless the config unties
    them) + bias. Always exact gelu, whatever hidden_act says, as in the reference."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h):  # (..., H) -> (..., V)
        return F.linear(self.norm(F.gelu(self.dense(h))), self.decoder.weight, self.bias)  # one fused matmul + bias


class LMModel(PreTrained):
    """Shared body of the masked- and causal-LM classes: encoder + LM head (tied)."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.lm_head = LMHead(config)
        init_weights(self.lm_head, config)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.decoder.weight = self.roberta.embeddings.word.weight

    def logits(self, hidden, positions=None):
        """LM logits (B, T, V) or, with `positions` (a bool (B, T) mask or index tuple), only at
        those positions (N, V): callers that need a few tokens never build the full tensor."""
        return self.lm_head(hidden if positions is None else hidden[positions])


class RobertaForMaskedLM(LMModel):
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        out = self.roberta(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            encoder_hidden_states, encoder_attention_mask,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        logits = self.logits(out.last_hidden_state)  # (B, T, V)
        loss = None
        if labels is not None:  # tokens labelled -100 are ignored
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1).to(logits.device))
        result = MaskedLMOutput(loss, logits, out.hidden_states, out.attentions)
        return returned(result, return_dict)


class RobertaForCausalLM(LMModel):
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        labels=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        if labels is not None:
            use_cache = False
        out = self.roberta(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            encoder_hidden_states, encoder_attention_mask, past_key_values, use_cache,
            output_attentions, output_hidden_states,
        )  # fmt: skip
        logits = self.logits(out.last_hidden_state)  # (B, T, V)
        loss = None
        if labels is not None:  # token t predicts token t+1; -100 ignored
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1).to(logits.device))
        result = CausalLMOutputWithCrossAttentions(
            loss, logits, out.past_key_values, out.hidden_states, out.attentions, out.cross_attentions
        )
        return returned(result, return_dict)


class ClassificationHead(nn.Module):
    """On the first token (<s>): dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, config: RobertaConfig):
        super().__init__()
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, h):  # (B, T, H) -> (B, num_labels)
        x = self.dropout(h[:, 0])
        return self.out_proj(self.dropout(torch.tanh(self.dense(x))))


def problem_type(config: RobertaConfig, labels: torch.Tensor | None) -> str:
    """The reference's inference when config.problem_type is null: one label is regression,
    integer labels are single-label, anything else multi-label. Without labels (inference),
    several outputs are single-label."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels is None or labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


class RobertaForSequenceClassification(PreTrained):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.classifier = ClassificationHead(config)
        init_weights(self.classifier, config)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        out = self.roberta(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask, inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )  # fmt: skip
        logits = self.classifier(out.last_hidden_state)  # (B, num_labels)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            kind = problem_type(self.config, labels)
            if kind == "regression":
                loss = F.mse_loss(logits.squeeze(), labels.squeeze()) if self.config.num_labels == 1 else F.mse_loss(logits, labels)
            elif kind == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        result = SequenceClassifierOutput(loss, logits, out.hidden_states, out.attentions)
        return returned(result, return_dict)

