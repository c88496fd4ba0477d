"""Checkpoint reading: subset loading touches only what it needs; bad checkpoints name the tensor and file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextserve.model.cache.pools import HybridCache
from nextserve.model.checkpoint import Checkpoint, CheckpointError
from nextserve.model.loader import load_experts, load_head
from nextserve.router.local_backend import load_local_backend


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_subset_loads_with_every_other_shard_deleted(reference: dict, tmp_path: Path) -> None:
    model, src = reference["small"]
    path = _copy(src, tmp_path / "ckpt")
    ckpt = Checkpoint(path)
    pairs = [(0, 3), (3, 11)]
    needed = {ckpt.key_to_file[f"model.layers.{l}.mlp.experts.{e}.{w}.weight"]
              for l, e in pairs for w in ("gate_proj", "up_proj", "down_proj")}
    shards = set(ckpt.key_to_file.values())
    assert len(shards) > len(needed) + 3, "the test needs a checkpoint with many shards"
    for shard in shards - needed:
        (path / shard).unlink()
    loaded = load_experts(path, pairs)
    assert loaded[0].expert_ids == (3,) and loaded[3].expert_ids == (11,)
    I = model.config.moe_intermediate_size
    want = model.model.layers[3].mlp.experts.gate_up_proj[11]
    assert torch.equal(loaded[3].gate_up[0], want)  # gate rows then up rows, as transformers fuses them
    assert torch.equal(loaded[3].gate_up[0, :I], want[:I])
    with pytest.raises(FileNotFoundError):
        load_experts(path, [(1, 0)])  # its shard is gone: the subset load above never opened it


def test_single_file_checkpoint_and_mtp_tensors_are_ignored(reference: dict, tmp_path: Path) -> None:
    model, src = reference["small"]
    path = _copy(src, tmp_path / "one")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (path / "model.safetensors.index.json").unlink()
    tensors["mtp.fc.weight"] = torch.zeros(4, 4)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    head = load_head(path)
    assert torch.equal(head.lm_head.weight, model.lm_head.weight)
    assert load_local_backend(path).gate_up[0].shape == model.model.layers[0].mlp.experts.gate_up_proj.shape


def _rewrite(path: Path, key: str, tensor: torch.Tensor | None, extra: dict[str, torch.Tensor] | None = None) -> str:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][key]
    tensors = load_file(path / shard)
    if tensor is None:
        del tensors[key]
    else:
        tensors[key] = tensor
    for k, v in (extra or {}).items():
        tensors[k] = v
        index["weight_map"][k] = shard
    save_file(tensors, path / shard, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


def test_missing_tensor_names_it(reference: dict, tmp_path: Path) -> None:
    path = _copy(reference["small"][1], tmp_path / "c")
    key = "model.layers.3.self_attn.k_norm.weight"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.self_attn\.k_norm\.weight.*missing"):
        load_head(path)


def test_misshaped_tensor_names_it_and_its_file(reference: dict, tmp_path: Path) -> None:
    path = _copy(reference["small"][1], tmp_path / "c")
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    shard = _rewrite(path, key, torch.zeros(3, 3))
    with pytest.raises(CheckpointError, match=rf"{key}.*{shard}.*\(3, 3\)"):
        load_experts(path, [(1, 2)])


def test_unexpected_tensor_names_it_and_its_file(reference: dict, tmp_path: Path) -> None:
    path = _copy(reference["small"][1], tmp_path / "c")
    shard = _rewrite(path, "model.norm.weight", None, extra={"model.norm.weight": torch.zeros(64),
                                                                "model.layers.0.surprise.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=rf"model\.layers\.0\.surprise\.weight.*{shard}"):
        load_head(path)


def test_bad_requests_are_clear(reference: dict) -> None:
    path = reference["small"][1]
    with pytest.raises(CheckpointError, match="expert 99"):
        load_experts(path, [(0, 99)])
    with pytest.raises(CheckpointError, match="dtype 'float16'"):
        load_head(path, "float16")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_head(path / "nope")


def test_tiny_mtp_layer_loads_on_the_head_and_its_experts_as_layer_8(tiny_dir: Path, tmp_path: Path) -> None:
    """The tiny's `mtp.*` (Qwen3-Next's layout): fc, the two pre-fc norms, one full-attention MoE decoder
    layer, a norm on the head; its routed experts read as layer num_hidden_layers (8) like any layer's."""
    ckpt = Checkpoint(tiny_dir)
    assert ckpt.config.num_nextn_predict_layers == 1 and ckpt.config.mtp_layers == (8,)
    assert ckpt.config.expert_layers == tuple(range(9))
    head = load_head(tiny_dir)
    assert head.mtp is not None and head.mtp.fc.weight.shape == (256, 512)
    mtp_keys = [k for k in ckpt.key_to_file if k.startswith("mtp.") and ".mlp.experts." not in k]
    want = ckpt.read(mtp_keys, torch.float32)
    state = head.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in mtp_keys) and len(mtp_keys) == 17
    assert set(head.config.mtp_layers) <= set(_pools(head))
    experts = load_experts(tiny_dir, [(8, 5), (8, 63)])[8]
    gate = ckpt.read(["mtp.layers.0.mlp.experts.63.gate_proj.weight"], torch.float32)
    assert torch.equal(experts.gate_up[1, :64], gate["mtp.layers.0.mlp.experts.63.gate_proj.weight"])
    assert load_head(tiny_dir, mtp=False).mtp is None
    with pytest.raises(CheckpointError, match="layer 9 has no routed experts"):
        load_experts(tiny_dir, [(9, 0)])
    # a config.json without the field: the count comes from the mtp.layers.J tensors present
    path = _copy(tiny_dir, tmp_path / "no-field")
    raw = json.loads((path / "config.json").read_text())
    del raw["num_nextn_predict_layers"]
    (path / "config.json").write_text(json.dumps(raw))
    assert Checkpoint(path).config.mtp_layers == (8,)


def _pools(head: torch.nn.Module) -> list[int]:
    cache = HybridCache(head.config, 1, 2, 16, 2, torch.float32, torch.device("cpu"))
    return sorted(cache.key)
