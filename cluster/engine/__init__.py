"""The head engine: continuous-batching scheduler, the engine thread (schedule -> forward -> sample ->
detokenize), the per-request output streams and the engine's stats. Runs inside a head replica (and in
one process for `nextserve generate` and tests); knows no Ray and no HTTP."""
