"""Read a Hugging Face Qwen3-Next checkpoint directory: the head's tensors, or a subset of experts.

A directory holds `config.json` and either `model.safetensors` or shards named by
`model.safetensors.index.json`. Only the shards that hold the requested tensors are opened, and only
the requested tensors are read (safetensors maps the file; nothing else is materialised).
Routed experts are stored per expert (`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`,
as the public checkpoints are); transformers' fused `mlp.experts.{gate_up_proj,down_proj}` layout is
read too, by slicing. The multi-token-prediction layer (`mtp.*`, Qwen3-Next's layout: `mtp.fc`,
`mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.layers.J.*` as a decoder layer, `mtp.norm`) is read
as layer num_hidden_layers + J: its routed experts `mtp.layers.J.mlp.experts.*` like any layer's. The MTP layers
counted are the `mtp.layers.J` present (none: no MTP), whatever config.json's `num_nextn_predict_layers` says
(transformers' save_pretrained keeps that count and drops the mtp.* tensors).

A fine-grained FP8 checkpoint (config.json's `quantization_config`, model/quantization.py) stores a
converted module's `X.weight` as float8_e4m3fn beside `X.weight_scale_inv`; `read_fp8` reads such a pair
as stored and checks it (dtype, the scale grid the block needs, the module not in modules_to_not_convert).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from nextserve.model.config import Qwen3NextConfig
from nextserve.model.kernels.fp8_block import FP8_DTYPE, scale_grid
from nextserve.model.quantization import Fp8BlockConfig, module_of, scale_key

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
STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                 "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
"""safetensors' header dtype names -> torch (what a header-only read builds its meta tensors with)."""


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
    def __init__(self, path: str | Path, is_meta: bool = False) -> None:
        """`is_meta`: reads return meta tensors of the stored shapes and dtypes, from the shards' headers
        only, so the loaders check a whole checkpoint without reading its bytes (`validate_checkpoint`)."""
        self.path = Path(path)
        self.is_meta = is_meta
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        self.config = Qwen3NextConfig.from_json(self.path)
        self.key_to_file = self._index()
        # The MTP layers are those whose tensors are here: config.json may count them or not, and a checkpoint
        # saved by transformers (which has no MTP) keeps the config's count without the mtp.* tensors.
        found = {int(m.group(1)) for key in self.key_to_file if (m := MTP_LAYER_KEY.match(key))}
        present = max(found) + 1 if found else 0
        if present != self.config.num_nextn_predict_layers:
            if not found:
                log.info("%s: config.json counts %d MTP layers but holds no mtp.* tensors: served without MTP",
                         self.path, self.config.num_nextn_predict_layers)
            self.config = dataclasses.replace(self.config, num_nextn_predict_layers=present)

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

    def is_fp8(self, weight_key: str) -> bool:
        """Whether `X.weight` is stored in FP8: its `X.weight_scale_inv` is in the checkpoint."""
        return scale_key(weight_key) in self.key_to_file

    def read(self, keys: Iterable[str], dtype: torch.dtype | None, progress: bool | None = None) -> dict[str, Tensor]:
        """Read exactly `keys`, opening only the shards that hold them; converted to `dtype`, or as stored
        (None). An FP8 tensor read into a float dtype is an error: it needs its scales (`read_fp8`)."""
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
                    tensor = self._meta(f, key) if self.is_meta else f.get_tensor(key)
                    if dtype is not None and tensor.dtype == FP8_DTYPE:
                        raise CheckpointError(f"tensor {key!r} in {self.path / file} is float8_e4m3fn but the "
                                              f"checkpoint has no {scale_key(key)!r} for it; an FP8 weight needs its "
                                              f"per-block scales")
                    out[key] = tensor if dtype is None else tensor.to(dtype)
                    bar.update()
        bar.close()
        return out

    def read_slices(self, key: str, rows: list[int], dtype: torch.dtype) -> Tensor:
        """Rows `rows` of dim 0 of one (fused) tensor, reading only those rows."""
        file = self.key_to_file[key]
        with safe_open(self.path / file, framework="pt") as f:
            if self.is_meta:
                return self._meta(f, key)[rows].to(dtype)
            sl = f.get_slice(key)
            return torch.stack([sl[r:r + 1][0] for r in rows]).to(dtype)

    def _meta(self, f: Any, key: str) -> Tensor:
        """A meta tensor with `key`'s stored shape and dtype, from the shard's header."""
        sl = f.get_slice(key)
        name = sl.get_dtype()
        if name not in STORED_DTYPES:
            raise CheckpointError(f"tensor {key!r} in {self.file_of(key)} has dtype {name}, which nextserve does not "
                                  f"read; save it as BF16, F32 or (with scales) F8_E4M3")
        return torch.empty(sl.get_shape(), dtype=STORED_DTYPES[name], device="meta")

    def fp8_scheme(self, weight_key: str) -> Fp8BlockConfig:
        """The FP8 config a quantized `weight_key` is read with; CheckpointError if the checkpoint's
        config.json does not make it an FP8 module."""
        scheme = self.config.quantization
        if scheme is None:
            raise CheckpointError(f"tensor {scale_key(weight_key)!r} in {self.file_of(scale_key(weight_key))}: the "
                                  f"checkpoint has FP8 scales but its config.json has no quantization_config; add "
                                  f"the one it was quantized with (quant_method 'fp8', weight_block_size)")
        if not scheme.is_converted(module_of(weight_key)):
            raise CheckpointError(f"tensor {scale_key(weight_key)!r} in {self.file_of(scale_key(weight_key))}: module "
                                  f"{module_of(weight_key)!r} is in modules_to_not_convert "
                                  f"{list(scheme.modules_to_not_convert)} but has FP8 scales")
        return scheme

    def read_fp8(self, weight_keys: Iterable[str], shapes: dict[str, torch.Size]) -> dict[str, tuple[Tensor, Tensor]]:
        """weight key -> (fp8 [R, C], scale_inv [gR, gC] float32) as stored, each checked against the
        weight's expected shape [R, C] (`shapes`) and the config's weight_block_size."""
        keys = list(weight_keys)
        for key in keys:
            self.fp8_scheme(key)
        raw = self.read([k for key in keys for k in (key, scale_key(key))], None)
        out = {}
        for key in keys:
            weight, scale = raw[key], raw[scale_key(key)]
            block = self.fp8_scheme(key).weight_block_size
            check_shapes(self, {key: weight}, {key: shapes[key]})
            if weight.dtype != FP8_DTYPE:
                raise CheckpointError(f"tensor {key!r} in {self.file_of(key)} is {str(weight.dtype).removeprefix('torch.')}"
                                      f" but has a {scale_key(key)!r}: an FP8 weight is float8_e4m3fn")
            grid = scale_grid(*shapes[key], block)
            if tuple(scale.shape) != grid:
                raise CheckpointError(f"tensor {scale_key(key)!r} in {self.file_of(scale_key(key))} has shape "
                                      f"{tuple(scale.shape)}; weight {tuple(shapes[key])} in blocks of {list(block)} "
                                      f"needs {grid}")
            out[key] = (weight, scale.to(torch.float32))
        return out

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
