"""One-process generation: the head model with an expert backend, batching all prompts.

Every step runs one batched forward over the live sequences: a sequence still prefilling brings its
next chunk of at most `prefill_chunk` tokens, a decoding one brings its last token. A sequence stops
at max_tokens or a stop token and leaves the batch at once; its cache is dropped with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nextserve.model.cache import SequenceCache
from nextserve.model.expert_backend import ExpertBackend
from nextserve.model.forward_batch import ForwardBatch
from nextserve.model.qwen3_next import HeadModel
from nextserve.model.sampling import SamplingParams, make_generator, sample

DEFAULT_PREFILL_CHUNK = 512
"""Tokens of one prompt prefilled per step; long prompts take several steps."""


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    cache: SequenceCache
    output: list[int] = field(default_factory=list)
    prefilled: int = 0
    generator: torch.Generator | None = None
    finished: bool = False

    def next_input(self, prefill_chunk: int) -> list[int]:
        if self.prefilled < len(self.prompt):
            return self.prompt[self.prefilled:self.prefilled + prefill_chunk]
        return [self.output[-1]]


def _finish_if_done(seq: Sequence, eos_ids: tuple[int, ...]) -> None:
    last = seq.output[-1]
    stops = seq.params.stop_token_ids + (() if seq.params.ignore_eos else eos_ids)
    if len(seq.output) >= seq.params.max_tokens or last in stops:
        seq.finished = True


def step(head: HeadModel, experts: ExpertBackend, live: list[Sequence], prefill_chunk: int) -> None:
    """One batched forward over `live`; appends a sampled token to every sequence that finished its prompt."""
    inputs = [s.next_input(prefill_chunk) for s in live]
    batch = ForwardBatch.build([len(x) for x in inputs], [s.cache for s in live], head.lm_head.weight.device)
    ids = torch.tensor([t for x in inputs for t in x], dtype=torch.int64, device=batch.positions.device)
    logits = head(ids, batch, experts)  # [B, V]
    for i, (seq, x) in enumerate(zip(live, inputs)):
        if seq.prefilled < len(seq.prompt):
            seq.prefilled += len(x)
            if seq.prefilled < len(seq.prompt):
                continue
        seq.output.append(sample(logits[i], seq.params, seq.generator))
        _finish_if_done(seq, head.config.eos_token_ids)


def generate(head: HeadModel, experts: ExpertBackend, prompts: list[list[int]],
             params: SamplingParams | list[SamplingParams],
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> list[list[int]]:
    """Generate for every prompt in one batch; returns each prompt's output token ids."""
    per_seq = params if isinstance(params, list) else [params] * len(prompts)
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    seqs = [Sequence(p, sp, SequenceCache.empty(head.config), generator=make_generator(sp))
            for p, sp in zip(prompts, per_seq)]
    live = list(seqs)
    while live:
        step(head, experts, live, prefill_chunk)
        live = [s for s in live if not s.finished]
    return [s.output for s in seqs]
