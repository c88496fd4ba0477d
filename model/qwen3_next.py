"""The Qwen3-Next head model: everything but the routed experts.

embed -> for each layer: x += mixer(input_norm(x)); x += ffn(post_norm(x)) -> final norm -> lm_head.
The mixer is a Gated DeltaNet or gated attention (by `layer_types`); the FFN is the MoE block's
head side (router gate, shared expert and its sigmoid gate) with the routed experts delegated to an
`ExpertBackend`, or a dense MLP for `mlp_only_layers`. Parameter names mirror the checkpoint's, so
the loader maps tensors by name; the checkpoint's MTP layer (`mtp.*`) is `HeadModel.mtp`, with the same
names. Letters: T = tokens in the step, B = sequences, H = hidden, V = vocab, k = top-k.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nextserve.model.cache.draft_kv import DraftKV
from nextserve.model.config import LayerType, Qwen3NextConfig
from nextserve.model.expert_backend import ExpertBackend
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.layers.attention import GatedAttention
from nextserve.model.layers.deltanet import GatedDeltaNet
from nextserve.model.layers.mlp import SwiGLUMLP
from nextserve.model.layers.moe_gate import MoEGate
from nextserve.model.layers.norm import RMSNorm
from nextserve.model.layers.rope import PartialRotaryEmbedding


class SparseMoEHead(nn.Module):
    """Head side of the sparse MoE block; the routed experts run in the backend."""

    def __init__(self, config: Qwen3NextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = MoEGate(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                            config.norm_topk_prob)
        self.shared_expert = SwiGLUMLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def start(self, x: Tensor, experts: ExpertBackend) -> "PendingMoE":
        """Send the routed experts off, compute the shared expert meanwhile; `result()` adds them."""
        ids, weights = self.gate(x)
        routed = experts.submit(self.layer_idx, x, ids, weights)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # [T, H]
        return PendingMoE(routed, shared)


@dataclass(slots=True)
class PendingMoE:
    routed: "Future[Tensor]"  # [T, H] from the expert backend
    shared: Tensor            # [T, H]

    def result(self) -> Tensor:
        return self.routed.result() + self.shared


def _finish(x: Tensor, moe: PendingMoE | None) -> Tensor:
    """A layer's output: its residual stream x [T, H] plus its MoE block's, once that is back."""
    return x if moe is None else x + moe.result()


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_type(layer_idx)
        H, eps = config.hidden_size, config.rms_norm_eps
        if self.layer_type is LayerType.LINEAR_ATTENTION:
            self.linear_attn = GatedDeltaNet(H, config.linear_num_key_heads, config.linear_num_value_heads,
                                             config.linear_key_head_dim, config.linear_value_head_dim,
                                             config.linear_conv_kernel_dim, eps, layer_idx)
        elif self.layer_type is LayerType.FULL_ATTENTION:
            self.self_attn = GatedAttention(H, config.num_attention_heads, config.num_key_value_heads,
                                            config.head_dim, eps, config.attention_bias, layer_idx)
        else:
            raise ValueError(f"Invalid layer_type {self.layer_type!r} for layer {layer_idx}")
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = SparseMoEHead(config, layer_idx) if self.is_moe else SwiGLUMLP(H, config.intermediate_size)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)

    def start(self, x: Tensor, batch: ForwardBatch, cos: Tensor, sin: Tensor,
              experts: ExpertBackend) -> tuple[Tensor, PendingMoE | None]:
        """Mixer, then the FFN; a MoE FFN is left in flight: the layer's output is x + moe.result()."""
        h = self.input_layernorm(x)
        if self.layer_type is LayerType.LINEAR_ATTENTION:
            x = x + self.linear_attn(h, batch)
        else:
            x = x + self.self_attn(h, batch, cos, sin)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            return x, self.mlp.start(h, experts)
        return x + self.mlp(h), None


class Backbone(nn.Module):
    def __init__(self, config: Qwen3NextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MultiTokenPredictor(nn.Module):
    """The checkpoint's MTP layers (`mtp.*`, Qwen3-Next's layout, as vLLM's Qwen3NextMultiTokenPredictor
    reads it): for the token t_{p+1} and the target's hidden state h_p (after the final norm) at position p,

        x = fc(cat(pre_fc_norm_embedding(embed(t_{p+1})), pre_fc_norm_hidden(h_p)))      [T, 2H] -> [T, H]
        x = DecoderLayer(x)      full attention at position p (its own K/V pool, layer num_hidden_layers + j)
                                 + sparse MoE (routed experts on the workers, like every layer's)
        g = norm(x)              -> lm_head(g): logits for t_{p+2};  g is also the next draft step's hidden

    embed_tokens and lm_head are the backbone's (shared)."""

    def __init__(self, config: Qwen3NextConfig) -> None:
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(H, eps)
        self.pre_fc_norm_hidden = RMSNorm(H, eps)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in config.mtp_layers)
        self.norm = RMSNorm(H, eps)

    def fuse(self, embeds: Tensor, hidden: Tensor) -> Tensor:
        """embeds, hidden [T, H] -> the layer's input [T, H]: embedding first, then the hidden state."""
        return self.fc(torch.cat((self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)), dim=-1))

    def forward(self, embeds: Tensor, hidden: Tensor, batch: ForwardBatch, cos: Tensor, sin: Tensor,
                experts: ExpertBackend, step: int = 0) -> Tensor:
        """Rows at the batch's positions, K/V written into the MTP layer's pool like any attention layer's:
        embeds, hidden [T, H] -> g [T, H] (after mtp.norm). `step` picks the layer (step % layers)."""
        layer = self.layers[step % len(self.layers)]
        x, moe = layer.start(self.fuse(embeds, hidden), batch, cos, sin, experts)
        return self.norm(_finish(x, moe))

    def draft(self, embeds: Tensor, hidden: Tensor, context: DraftKV, cos: Tensor, sin: Tensor,
              experts: ExpertBackend, step: int = 0) -> Tensor:
        """One speculative row per sequence, its K/V appended to `context` (never to the pools: the row is
        a guess until the target verifies it): embeds, hidden [B, H] -> g [B, H]."""
        layer = self.layers[step % len(self.layers)]
        x = self.fuse(embeds, hidden)
        q, k, v, gate = layer.self_attn.project(layer.input_layernorm(x), cos, sin)
        x = x + layer.self_attn.gated_output(context.append_and_attend(q, k, v), gate)
        h = layer.post_attention_layernorm(x)
        x = _finish(x, layer.mlp.start(h, experts)) if layer.is_moe else x + layer.mlp(h)
        return self.norm(x)


class HeadModel(nn.Module):
    """Qwen3NextForCausalLM minus the routed experts. Holds no routed-expert weight."""

    def __init__(self, config: Qwen3NextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = PartialRotaryEmbedding(config.rotary_dim, config.rope_theta)
        self.mtp = MultiTokenPredictor(config) if config.has_mtp else None

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, batch: ForwardBatch, experts: ExpertBackend,
                all_logits: bool = False) -> Tensor:
        """input_ids [T] (flattened over the batch's sequences) -> logits [B, V] of each sequence's
        last new token, or [T, V] with all_logits. Writes the new tokens' K/V and states into the batch's
        cache; the caller counts them (the next step's `num_cached`)."""
        logits = self.forward_micro_batches([(input_ids, batch)], experts, all_logits)
        assert isinstance(logits, Tensor)
        return logits

    @torch.inference_mode()
    def forward_micro_batches(self, parts: Sequence[tuple[Tensor, ForwardBatch]], experts: ExpertBackend,
                              all_logits: bool = False, with_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Several micro-batches (disjoint sequences) through the layers in ping-pong: while the routed
        experts of micro-batch A's layer run in the backend, the head computes B's mixer, then waits
        for A. Each sequence's arithmetic is that of `forward` alone. parts: (input_ids [T_i], batch_i)
        -> logits of all parts concatenated in order ([sum R_i, V]: each sequence's last token, every
        token of a verify chunk; [sum T_i, V] with all_logits); with_hidden: (logits, the final-norm hidden
        states of every token [sum T_i, H]), what a drafter reads."""
        xs = [self.model.embed_tokens(ids) for ids, _ in parts]  # [T_i, H]
        rope = [self.rotary.cos_sin(b.positions, x.dtype) for (_, b), x in zip(parts, xs)]
        pending: list[PendingMoE | None] = [None] * len(parts)
        for layer in self.model.layers:
            for i, (_, batch) in enumerate(parts):
                x = _finish(xs[i], pending[i])  # the previous layer's MoE, needed now
                xs[i], pending[i] = layer.start(x, batch, *rope[i], experts)
        outs = []
        for i, (_, batch) in enumerate(parts):
            x = _finish(xs[i], pending[i])
            outs.append(x if all_logits or with_hidden else x[batch.logit_index()])
        h = self.model.norm(torch.cat(outs) if len(outs) > 1 else outs[0])  # [R, H], or [T, H]
        if not with_hidden:
            return self.lm_head(h)
        rows = torch.cat([batch.logit_index() + offset for (_, batch), offset in
                          zip(parts, itertools.accumulate((b.num_tokens for _, b in parts), initial=0))])
        return self.lm_head(h if all_logits else h[rows]), h
