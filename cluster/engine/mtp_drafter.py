"""MTP drafts: the checkpoint's multi-token-prediction layer (`HeadModel.mtp`) proposes the next K tokens.

After every step, for each sequence of it (cluster/engine/drafter.py's DraftInput: the positions the step
kept, their final-norm hidden states h_p, the tokens):

    catch-up   one batched MTP pass over the kept positions p in [position, position + n): row p reads
               (t_{p+1}, h_p) (t_{p+1} the next prompt token, an accepted draft, or the token just sampled),
               and writes its K/V into the MTP layer's pool at p (model/cache/pools.py: the sequence's own
               blocks), so the layer's cache holds every position the head's does. Sequences not drafted now
               (prefilling, drafting off for the batch size) run it too: their later drafts need those rows.
    draft 1    the last row (p = P - 1, the sampled token t_P): d_1 = argmax lm_head(g_{P-1})
    draft j>1  one row per sequence at position P + j - 2 reading (d_{j-1}, g) (g: the previous draft row's
               output, as vLLM reuses the layer on its own hidden state), attending to the pool's rows
               [0, P) and this round's draft rows (model/cache/draft_kv.py: never written to the pools)

Drafts are greedy (argmax), as vLLM's and SGLang's MTP drafters; the engine verifies them, so a bad draft
costs speed only. The MTP layer's MoE goes to the expert backend as layer num_hidden_layers + j: one more
dispatch round per draft step. A prefix-cache hit restores the MTP rows with the blocks; the last row of a
restored block was computed with the token that followed it in the request that filled it (row p reads
t_{p+1}), so a hit whose next token differs drafts from one stale row until the target verifies.

Letters: B = sequences, T = catch-up rows over them, H = hidden, V = vocab, K = draft tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nextserve.cluster.engine.drafter import DraftInput
from nextserve.model.cache.draft_kv import DraftKV
from nextserve.model.cache.pools import HybridCache
from nextserve.model.expert_backend import ExpertBackend
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.qwen3_next import HeadModel, MultiTokenPredictor


class MtpDrafter:
    """The `Drafter` of method "mtp" over a head's cache and expert backend."""

    needs_hidden_states = True

    def __init__(self, head: HeadModel, experts: ExpertBackend, cache: HybridCache) -> None:
        if head.mtp is None:
            raise ValueError("the head has no MTP layer (checkpoint without mtp.* tensors, or loaded with mtp=False)")
        self.head, self.mtp, self.experts, self.cache = head, head.mtp, experts, cache

    def propose(self, inputs: Sequence[DraftInput]) -> list[list[int]]:
        with torch.inference_mode():
            return self._propose(inputs)

    def release(self, request_id: str) -> None:
        """Nothing to drop: the MTP rows live in the sequence's blocks, freed with them."""

    def _propose(self, inputs: Sequence[DraftInput]) -> list[list[int]]:
        proposals: list[list[int]] = [[] for _ in inputs]
        rows = [i for i, x in enumerate(inputs) if x.hidden is not None and _num_rows(x) > 0]
        if not rows:
            return proposals
        last = self._catch_up([inputs[i] for i in rows])  # [B, H]
        drafting = [j for j, i in enumerate(rows) if inputs[i].num_draft_tokens > 0
                    and inputs[i].position + _num_rows(inputs[i]) == len(inputs[i].token_ids) - 1]
        if not drafting:
            return proposals
        seqs = [inputs[rows[j]] for j in drafting]
        drafts = draft_tokens(self.head, self.mtp, self.experts, self.cache, seqs, last[drafting])
        for j, tokens in zip(drafting, drafts):
            proposals[rows[j]] = tokens[:inputs[rows[j]].num_draft_tokens]
        return proposals

    def _catch_up(self, inputs: Sequence[DraftInput]) -> Tensor:
        """The MTP rows of every kept position, into the pool -> g [B, H] of each sequence's last row."""
        lengths = [_num_rows(x) for x in inputs]
        batch = ForwardBatch.build(lengths, [x.position for x in inputs], [x.slot for x in inputs], self.cache)
        device = self.cache.device
        ids = torch.tensor([t for x, n in zip(inputs, lengths) for t in x.token_ids[x.position + 1:x.position + 1 + n]],
                           dtype=torch.int64, device=device)  # [T] t_{p+1}
        hidden = torch.cat([x.hidden[:n] for x, n in zip(inputs, lengths) if x.hidden is not None])  # [T, H]
        embeds = self.head.model.embed_tokens(ids)
        cos, sin = self.head.rotary.cos_sin(batch.positions, embeds.dtype)
        g = self.mtp(embeds, hidden.to(embeds.dtype), batch, cos, sin, self.experts)  # [T, H]
        return g[batch.last_token_index()]


def _num_rows(x: DraftInput) -> int:
    """Kept positions whose next token is known (every one, but a defensive bound: row p needs t_{p+1})."""
    n = 0 if x.hidden is None else x.hidden.shape[0]
    return max(0, min(n, len(x.token_ids) - 1 - x.position))


def draft_tokens(head: HeadModel, mtp: MultiTokenPredictor, experts: ExpertBackend, cache: HybridCache,
                 inputs: Sequence[DraftInput], last: Tensor) -> list[list[int]]:
    """K = max num_draft_tokens greedy drafts per sequence from g_{P-1} = last [B, H] (the catch-up's last
    row: P = the tokens each sequence holds in the cache, its pool rows [0, P))."""
    device, bs = cache.device, cache.block_size
    K = max(x.num_draft_tokens for x in inputs)
    cached = torch.tensor([len(x.token_ids) - 1 for x in inputs], dtype=torch.int64, device=device)  # [B] P
    token = head.lm_head(last).argmax(dim=-1)  # [B] d_1
    out = [token]
    if K > 1:
        blocks = cache.block_table[torch.tensor([x.slot for x in inputs], device=device), :-(-int(cached.max()) // bs)]
        context = DraftKV(cache, mtp.layers[0].self_attn.layer_idx, blocks, cached)
        g = last
        for j in range(1, K):
            cos, sin = head.rotary.cos_sin(cached + j - 1, last.dtype)
            g = mtp.draft(head.model.embed_tokens(token), g, context, cos, sin, experts, step=j)
            token = head.lm_head(g).argmax(dim=-1)
            out.append(token)
    return torch.stack(out, dim=1).tolist()  # [B, K]
