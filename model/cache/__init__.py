"""The head's hybrid cache, one concept in one package: the tensors and who owns which part of them.

    pools          the preallocated tensors (DeltaNet state slots, paged KV blocks, state snapshots)
    budget         bytes -> blocks + slots + snapshots (pure arithmetic; the engine and `nextserve plan`)
    block_manager  which sequence owns which slot, blocks and snapshots (pure bookkeeping over ids)
    prefix_cache   refcounted, content-keyed KV blocks and state snapshots with LRU eviction (pure)

It sits in model/ because the head model indexes the pools, and model/ imports nothing above it; the
engine's scheduler drives the bookkeeping. No torch in block_manager or prefix_cache, no I/O anywhere."""
