"""Read a Hugging Face Qwen3-Next checkpoint directory: the head's tensors, or a subset of experts.

A directory holds `config.json` and either `model.safetensors` or shards named by
`model.safetensors.index.json`. Only the shards that hold the requested tensors are opened, and only
the requested tensors are read (safetensors maps the file; nothing else is materialised).
Routed experts are stored per expert (`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`,
as the public checkpoints are); transformers' fused `mlp.experts.{gate_up_proj,down_proj}` layout is
read too, by slicing. The multi-token-prediction layer (`mtp.*`, Qwen3-Next's layout: `mtp.fc`,
`mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.layers.J.*` as a decoder layer, `mtp.norm`) is read
as layer num_hidden_layers + J: its routed experts `mtp.layers.J.mlp.experts.*` like any layer's. A config.json
without `num_nextn_predict_layers` takes the count from the `mtp.layers.J` tensors present (none: no MTP).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from nextserve.model.config import Qwen3NextConfig

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPERT_KEY = re.compile(r"^(model|mtp)\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED_EXPERT_KEY = re.compile(r"^(model|mtp)\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
MTP_KEY = re.compile(r"^mtp\.")
MTP_LAYER_KEY = re.compile(r"^mtp\.layers\.(\d+)\.")
PROGRESS_MIN_TENSORS = 2000
"""Loads of at least this many tensors show a progress bar (the tiny model has ~1,600 tensors, the real one ~75,000)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that does not match what the config needs; names the tensor and the file."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise CheckpointError(f"dtype {name} is not supported; use float32 or bfloat16")
        return name
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


class Checkpoint:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        self.config = Qwen3NextConfig.from_json(self.path)
        self.key_to_file = self._index()
        if "num_nextn_predict_layers" not in json.loads((self.path / "config.json").read_text()):
            found = {int(m.group(1)) for key in self.key_to_file if (m := MTP_LAYER_KEY.match(key))}
            if found:
                self.config = dataclasses.replace(self.config, num_nextn_predict_layers=max(found) + 1)

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' object")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if not single.exists():
            raise CheckpointError(f"{self.path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        with safe_open(single, framework="pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}

    def read(self, keys: Iterable[str], dtype: torch.dtype, progress: bool | None = None) -> dict[str, Tensor]:
        """Read exactly `keys`, opening only the shards that hold them."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            if key not in self.key_to_file:
                raise CheckpointError(f"tensor {key!r} is missing from the checkpoint at {self.path}")
            by_file[self.key_to_file[key]].append(key)
        total = sum(len(v) for v in by_file.values())
        bar = tqdm(total=total, desc=f"loading {self.path.name}", unit="tensor",
                   disable=not (progress if progress is not None else total >= PROGRESS_MIN_TENSORS))
        out: dict[str, Tensor] = {}
        for file, file_keys in sorted(by_file.items()):
            with safe_open(self.path / file, framework="pt") as f:
                for key in file_keys:
                    out[key] = f.get_tensor(key).to(dtype)
                    bar.update()
        bar.close()
        return out

    def read_slices(self, key: str, rows: list[int], dtype: torch.dtype) -> Tensor:
        """Rows `rows` of dim 0 of one (fused) tensor, reading only those rows."""
        file = self.key_to_file[key]
        with safe_open(self.path / file, framework="pt") as f:
            sl = f.get_slice(key)
            return torch.stack([sl[r:r + 1][0] for r in rows]).to(dtype)

    def file_of(self, key: str) -> str:
        return str(self.path / self.key_to_file.get(key, INDEX_FILE))


def layer_prefix(config: Qwen3NextConfig, layer: int) -> str:
    """The checkpoint's name of layer `layer`: `model.layers.i` for the backbone, `mtp.layers.j` for the
    MTP layer j (layer index num_hidden_layers + j)."""
    if layer in config.mtp_layers:
        return f"mtp.layers.{layer - config.num_hidden_layers}"
    return f"model.layers.{layer}"


def check_shapes(ckpt: Checkpoint, tensors: dict[str, Tensor], expected: dict[str, torch.Size]) -> None:
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {key!r} in {ckpt.file_of(key)} has shape {tuple(tensors[key].shape)}, "
                f"the config needs {tuple(shape)}")
