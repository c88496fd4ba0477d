"""The Serve application's arguments: what `nextserve up` passes and what a RayService's
`serveConfigV2` gives as `args` for `import_path: cluster.app:build_app`. Validated with pydantic
(a process boundary); names match the CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    """Checkpoint directory, as seen by every node (a PVC mount on Kubernetes)."""
    model_name: str | None = None
    """The name clients pass as `model`; default: the checkpoint directory's name."""
    expert_workers: int = Field(2, ge=1)
    expert_replicas: int = Field(1, ge=1)
    head_replicas: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    redis_url: str = ""
    """Empty only before `nextserve up` fills in the local redis-server it started."""
    cluster: str = "default"
    """Registry namespace in Redis (several clusters can share one Redis)."""
    api_key: str | None = None
    max_num_seqs: int = Field(64, ge=1)
    max_tokens_per_step: int = Field(512, ge=1)
    prefill_chunk: int = Field(256, ge=1)
    dispatch_deadline_s: float = Field(10.0, gt=0)
    """Per-attempt gRPC deadline of one dispatch to one worker (then its tokens fail over)."""

    @field_validator("model")
    @classmethod
    def _model_dir(cls, value: str) -> str:
        if not (Path(value) / "config.json").exists():
            raise ValueError(f"model {value!r} is not a checkpoint directory (no config.json)")
        return value

    def served_model_name(self) -> str:
        return self.model_name or Path(self.model).name

    def cluster_spec(self) -> dict[str, object]:
        return {"model": self.model, "dtype": self.dtype, "num_workers": self.expert_workers,
                "replication": self.expert_replicas}
