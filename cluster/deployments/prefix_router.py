"""Which head replica a request goes to: the one most likely to hold its prompt's prefix in its cache.

    gateway's handle --generate(EngineRequest)--> PrefixAffinityRouter.choose_replicas
        key = hash(tenant, cache_salt, prompt_cache_key, prompt_ids[:ROUTE_PREFIX_TOKENS])
              (None for calls without a prompt)
        ranked = replicas by rendezvous hash of (key, replica)  (highest random weight first)
        first choice ranked[0], unless it has IMBALANCE more requests queued than the least loaded one:
        then the least loaded (Serve's own probing picks among them)
    gateway's handle --channel(ChannelOpen)--> the replica the ChannelOpen names (output_channel.py); every
        replica when it is not among them (one that is not named refuses it)

Rendezvous hashing keeps a key on its replica while replicas come and go: adding or removing one of M
replicas moves only the keys that rank it first (about 1/M of the conversations, whose next turn then
prefills cold once); every other conversation keeps landing where its cache is. The key is the first
ROUTE_PREFIX_TOKENS tokens: an agent's conversations that share that much (one system prompt) share a
replica while the load stays within IMBALANCE, and spread over the others past it. The tenant and cache
salt are hashed too, as they root the heads' prefix-cache keys: two tenants' equal prompts share no cache,
so nothing ties them to one replica. A client's `prompt_cache_key` (Responses; Codex sends its session id)
is hashed too: an agent's sessions share their first ROUTE_PREFIX_TOKENS tokens (one system prompt and tool
list), so without it every session of that agent would rank the same replica first; with it each session
has a home of its own and keeps it for all its turns.

Runs inside the gateway's process (Serve's handle-side router; RequestRouter is a Ray Serve alpha API).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from ray.serve.request_router import (FIFOMixin, LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter,
                                     RunningReplica)

from nextserve.cluster.deployments.output_channel import ChannelOpen
from nextserve.cluster.engine.contract import EngineRequest
from nextserve.model.cache.prefix_cache import salt_key

ROUTE_PREFIX_TOKENS = 256
"""Prompt tokens that choose the replica (a multiple of the KV block size)."""
IMBALANCE = 8
"""Requests the preferred replica may have queued beyond the least loaded one before it is passed over."""


def prefix_key(prompt_ids: Sequence[int], tenant: str = "", cache_salt: str = "",
               prompt_cache_key: str = "") -> bytes:
    """A stable key of the prompt's first ROUTE_PREFIX_TOKENS tokens, its prefix-cache salt and the client's
    session key (the same in every gateway process)."""
    head = list(prompt_ids[:ROUTE_PREFIX_TOKENS])
    digest = hashlib.blake2b(struct.pack(f"<{len(head)}q", *head), digest_size=16)
    salt = salt_key(tenant, cache_salt)
    if salt is not None:
        digest.update(salt)
    if prompt_cache_key:
        digest.update(b"\0prompt_cache_key\0" + prompt_cache_key.encode())
    return digest.digest()


def rank_replicas(key: bytes, replica_ids: Sequence[str]) -> list[str]:
    """`replica_ids` by rendezvous (highest random weight) hashing of `key`: the first is the key's home."""
    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(key + replica_id.encode(), digest_size=8).digest()
    return sorted(replica_ids, key=weight, reverse=True)


class PrefixAffinityRouter(FIFOMixin, MultiplexMixin, LocalityMixin, RequestRouter):
    """Serve's request router for the heads' handle, on the mixins of Serve's default router (FIFO
    matching of found replicas to waiting requests needs the multiplex bookkeeping)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every round offers every replica, so the next round must back off: without it Serve's routing
            # task retries at once, never yielding to the loop that answers its queue-length probes.
            pending_request.routing_context.should_backoff = True
        named = _named_replica(pending_request)
        if named is not None:  # an output channel is for one head replica
            return [[r for r in candidate_replicas if r.replica_id.unique_id == named] or candidate_replicas]
        request = _request_of(pending_request)
        if request is None or len(candidate_replicas) < 2:
            return [candidate_replicas]  # stats / probes: the least loaded
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        key = prefix_key(request.prompt_ids, request.tenant, request.cache_salt, request.prompt_cache_key)
        ranked = [by_id[i] for i in rank_replicas(key, list(by_id))]
        queued = [self.replica_queue_len_cache.get(r.replica_id) or 0 for r in ranked]
        if queued[0] - min(queued) > IMBALANCE:
            return [candidate_replicas]
        return [ranked[:1], ranked[1:]]


def _named_replica(pending_request: PendingRequest | None) -> str | None:
    """The head replica a HeadDeployment.channel(ChannelOpen) call is for, else None."""
    if pending_request is None or pending_request.metadata.call_method != "channel" or not pending_request.args:
        return None
    request = pending_request.args[0]
    return request.head_id if isinstance(request, ChannelOpen) else None


def _request_of(pending_request: PendingRequest | None) -> EngineRequest | None:
    """The request of a HeadDeployment.generate(EngineRequest) call with a prompt, else None."""
    if pending_request is None or pending_request.metadata.call_method != "generate" or not pending_request.args:
        return None
    request = pending_request.args[0]
    return request if isinstance(request, EngineRequest) and request.prompt_ids else None
