"""nextserve: distributed serving for Qwen3-Next hybrid MoE models.

The repository root is the `nextserve` package (pyproject.toml maps it with `package-dir`), so the
folders import as `nextserve.model`, `nextserve.router`, `nextserve.experts`, `nextserve.proto`,
`nextserve.cluster` and `nextserve.bench`; no top-level name of ours can collide with another
distribution's (proto-plus installs a top-level `proto`).
"""
