"""The MTP layer written out plainly (dense causal attention over the whole sequence, routed experts in a
per-expert loop, no cache): the reference the MTP drafter's paged, batched forward is checked against, and
the differentiable forward tests/mtp_checkpoint.py trains the tiny's MTP layer with.

    row p (p = 0 .. L-1):  x_p = fc(cat(pre_fc_norm_embedding(embed(t_{p+1})), pre_fc_norm_hidden(h_p)))
                           x   = x + attention(input_layernorm(x))     causal, position p, GQA, sigmoid gate
                           x   = x + MoE(post_attention_layernorm(x))  router top-k + shared expert
                           g_p = norm(x)                                logits for t_{p+2} = lm_head(g_p)

Letters: L = rows, H = hidden, nh / nkv = heads, hd = head dim, E = experts, I = moe intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nextserve.model.layers.rope import apply_partial_rope
from nextserve.model.qwen3_next import HeadModel


def mtp_rows(head: HeadModel, gate_up: Tensor, down: Tensor, next_tokens: Tensor, hidden: Tensor,
             seq_lens: list[int] | None = None) -> Tensor:
    """next_tokens [L] (t_{p+1}), hidden [L, H] (h_p) at positions 0 .. L-1; gate_up [E, 2I, H], down [E, H, I]
    the MTP layer's routed experts -> g [L, H]. `seq_lens`: the L rows are several sequences one after the
    other (positions restart at 0, attention stays within each)."""
    assert head.mtp is not None
    seq_lens = seq_lens or [next_tokens.shape[0]]
    positions = torch.cat([torch.arange(n) for n in seq_lens])  # [L]
    segment = torch.cat([torch.full((n,), i) for i, n in enumerate(seq_lens)])  # [L]
    mtp, layer = head.mtp, head.mtp.layers[0]
    attn, moe = layer.self_attn, layer.mlp
    L, nh, nkv, hd = next_tokens.shape[0], attn.nh, attn.nkv, attn.hd
    x = mtp.fc(torch.cat((mtp.pre_fc_norm_embedding(head.model.embed_tokens(next_tokens)),
                          mtp.pre_fc_norm_hidden(hidden)), dim=-1))
    h = layer.input_layernorm(x)
    cos, sin = head.rotary.cos_sin(positions, x.dtype)
    qg = attn.q_proj(h).view(L, nh, 2 * hd)
    q = apply_partial_rope(attn.q_norm(qg[..., :hd]), cos, sin).transpose(0, 1)  # [nh, L, hd]
    k = apply_partial_rope(attn.k_norm(attn.k_proj(h).view(L, nkv, hd)), cos, sin).transpose(0, 1)
    v = attn.v_proj(h).view(L, nkv, hd).transpose(0, 1)
    k, v = k.repeat_interleave(nh // nkv, dim=0), v.repeat_interleave(nh // nkv, dim=0)  # head i reads kv i // g
    scores = (q @ k.transpose(1, 2)) * hd ** -0.5  # [nh, L, L]
    causal = torch.ones(L, L, dtype=torch.bool).tril() & (segment[:, None] == segment[None, :])
    scores = scores.masked_fill(~causal, float("-inf"))
    o = (scores.softmax(dim=-1) @ v).transpose(0, 1).reshape(L, nh * hd)
    x = x + attn.o_proj(o * torch.sigmoid(qg[..., hd:].reshape(L, nh * hd)))
    h = layer.post_attention_layernorm(x)
    probs = F.linear(h, moe.gate.weight).softmax(dim=-1, dtype=torch.float32)  # [L, E]
    weights, ids = probs.topk(moe.gate.top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype)
    routed = torch.zeros_like(h)
    I = down.shape[-1]
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        gu = h[token] @ gate_up[e].T  # [n, 2I]
        out = (F.silu(gu[:, :I]) * gu[:, I:]) @ down[e].T  # [n, H]
        routed = routed.index_add(0, token, out * weights[token, slot, None])
    shared = torch.sigmoid(moe.shared_expert_gate(h)) * moe.shared_expert(h)
    return mtp.norm(x + routed + shared)


def reference_drafts(head: HeadModel, gate_up: Tensor, down: Tensor, tokens: list[int], hidden: Tensor,
                     k: int) -> list[int]:
    """The k greedy drafts after tokens t_0 .. t_P given the target's hidden states h_0 .. h_{P-1} [P, H]:
    each draft appends the row (d_j, g of the previous last row) and recomputes every row from scratch."""
    next_tokens, rows, drafts = torch.tensor(tokens[1:]), hidden, []
    for _ in range(k):
        g = mtp_rows(head, gate_up, down, next_tokens, rows)
        d = int(head.lm_head(g[-1]).argmax())
        drafts.append(d)
        next_tokens, rows = torch.cat((next_tokens, torch.tensor([d]))), torch.cat((rows, g[-1:]))
    return drafts
