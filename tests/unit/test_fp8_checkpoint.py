"""Fine-grained FP8 checkpoints: transformers reads ours as its twin, we load them (heads dequantized,
experts kept FP8), greedy equals transformers on the twin, subset loads stay subsets, and bad ones are
named in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config

from engine_run import engine_tokens, random_prompt
from nextserve.model.checkpoint import Checkpoint, CheckpointError
from nextserve.model.config import ConfigError, Qwen3NextConfig
from nextserve.model.kernels.fp8_block import FP8_DTYPE, dequantize_blocks
from nextserve.model.layers.experts import Fp8Experts
from nextserve.model.loader import load_experts, load_head, validate_checkpoint
from nextserve.model.sampling import SamplingParams
from nextserve.router.local_backend import load_local_backend

EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, key: str, tensor: torch.Tensor | None) -> str:
    """Replace (or, None: delete) one tensor in its shard; the shard's name."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][key]
    tensors = load_file(path / shard)
    if tensor is None:
        del tensors[key]
        del index["weight_map"][key]
    else:
        tensors[key] = tensor
    save_file(tensors, path / shard, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


def test_transformers_loads_our_fp8_checkpoint_as_its_dequantized_twin(fp8_reference: dict) -> None:
    """The layout is transformers' FineGrainedFP8 one: dequantize=True on CPU gives the twin's weights."""
    _, fp8, twin = fp8_reference["small"]
    config = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 16],
                      "modules_to_not_convert": ["lm_head", "model.embed_tokens", "mlp.gate", "mlp.shared_expert_gate"]}
    theirs = AutoModelForCausalLM.from_pretrained(fp8, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                  dtype=torch.float32).state_dict()
    want = fp8_reference["small"][0].state_dict()
    assert theirs.keys() == want.keys()
    assert all(torch.equal(theirs[k], want[k]) for k in want)
    ckpt = Checkpoint(fp8)
    with safe_open(fp8 / ckpt.key_to_file["lm_head.weight"], framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.float32  # modules_to_not_convert stays as it was
    with safe_open(fp8 / ckpt.key_to_file[EXPERT.format(layer=1, expert=3, proj="up_proj")], framework="pt") as f:
        assert f.get_tensor(EXPERT.format(layer=1, expert=3, proj="up_proj")).dtype == FP8_DTYPE


@pytest.mark.parametrize("name", ["small", "awkward"])
def test_heads_dequantize_and_experts_stay_fp8(fp8_reference: dict, name: str) -> None:
    _, fp8, twin = fp8_reference[name]
    ours, want = load_head(fp8).state_dict(), load_head(twin).state_dict()
    assert all(torch.equal(ours[k], want[k]) for k in want)
    fp8_experts, dense = load_local_backend(fp8), load_local_backend(twin)
    layer = Qwen3NextConfig.from_json(fp8).moe_layers[-1]
    assert isinstance(fp8_experts.gate_up[layer], Fp8Experts) and isinstance(fp8_experts.down[layer], Fp8Experts)
    assert torch.equal(fp8_experts.gate_up[layer].dequantize(), dense.gate_up[layer])
    assert torch.equal(fp8_experts.down[layer].dequantize(), dense.down[layer])
    held = fp8_experts.gate_up[layer].nbytes + fp8_experts.down[layer].nbytes
    bf16 = dense.gate_up[layer].to(torch.bfloat16).nbytes + dense.down[layer].to(torch.bfloat16).nbytes
    assert held <= 0.55 * bf16 + 1024  # 1 B per weight + scales (these tiny blocks make scales a visible share)


def test_ragged_blocks_dequantize_per_block(fp8_reference: dict) -> None:
    """awkward: hidden 40, intermediate 24 in 16 x 32 blocks: gate [24, 40] has a ragged last block both ways."""
    _, fp8, _ = fp8_reference["awkward"]
    key = EXPERT.format(layer=0, expert=12, proj="gate_proj")
    ckpt = Checkpoint(fp8)
    raw = ckpt.read([key, key.replace("weight", "weight_scale_inv")], None)
    weight, scale = raw[key], raw[key.replace("weight", "weight_scale_inv")]
    assert tuple(scale.shape) == (2, 2)
    want = weight.to(torch.float32).clone()
    for i, rows in enumerate((slice(0, 16), slice(16, 24))):
        for j, cols in enumerate((slice(0, 32), slice(32, 40))):
            want[rows, cols] *= scale[i, j]
    loaded = load_experts(fp8, [(0, 12)])[0].gate_up
    assert isinstance(loaded, Fp8Experts)
    assert torch.equal(loaded.dequantize()[0, :24], want)
    assert torch.equal(dequantize_blocks(weight, scale, (16, 32), torch.float32), want)


@pytest.mark.parametrize("name", ["small", "awkward"])
@torch.inference_mode()
def test_greedy_on_fp8_equals_transformers_on_the_twin(fp8_reference: dict, name: str) -> None:
    model, fp8, _ = fp8_reference[name]
    prompts = [random_prompt(n, 300, seed=n) for n in (5, 17, 30)]
    ours = engine_tokens(load_head(fp8), load_local_backend(fp8), prompts,
                         SamplingParams(max_tokens=16, ignore_eos=True))
    for prompt, got in zip(prompts, ours):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert got == want[0, len(prompt):].tolist()


def test_subset_load_reads_only_its_experts_and_scales(fp8_reference: dict, tmp_path: Path) -> None:
    path = _copy(fp8_reference["small"][1], tmp_path / "ckpt")
    ckpt = Checkpoint(path)
    pairs = [(0, 3), (3, 11)]
    needed = {ckpt.key_to_file[EXPERT.format(layer=l, expert=e, proj=p) + suffix]
              for l, e in pairs for p in ("gate_proj", "up_proj", "down_proj") for suffix in ("", "_scale_inv")}
    shards = set(ckpt.key_to_file.values())
    assert len(shards) > len(needed) + 3, "the test needs a checkpoint with many shards"
    for shard in shards - needed:
        (path / shard).unlink()
    loaded = load_experts(path, pairs)
    assert loaded[0].expert_ids == (3,) and loaded[3].expert_ids == (11,)
    twin = load_experts(fp8_reference["small"][2], pairs)
    assert isinstance(loaded[3].gate_up, Fp8Experts) and torch.equal(loaded[3].gate_up.dequantize(), twin[3].gate_up)
    with pytest.raises(FileNotFoundError):
        load_experts(path, [(1, 0)])  # its shard is gone: the subset load above never opened it


@pytest.mark.parametrize("key,loader", [
    (EXPERT.format(layer=1, expert=2, proj="down_proj"), lambda p: load_experts(p, [(1, 2)])),
    ("model.layers.3.self_attn.q_proj.weight", load_head),
])
def test_a_misshaped_scale_names_the_tensor_expected_and_found(fp8_reference: dict, tmp_path: Path, key: str,
                                                                loader: object) -> None:
    path = _copy(fp8_reference["small"][1], tmp_path / "c")
    scale = key.replace("weight", "weight_scale_inv")
    shard = _rewrite(path, scale, torch.ones(3, 3))
    expected = tuple(Checkpoint(fp8_reference["small"][1]).read([scale], None)[scale].shape)
    pattern = rf"{scale}.*{shard} has shape \(3, 3\).*needs \({expected[0]}, {expected[1]}\)"
    with pytest.raises(CheckpointError, match=pattern) as raised:
        loader(path)  # type: ignore[operator]
    assert "\n" not in str(raised.value)
    with pytest.raises(CheckpointError, match=pattern):
        validate_checkpoint(path)  # what `nextserve up` runs first: the same line from the headers alone


def test_an_fp8_weight_without_its_scale_is_named(fp8_reference: dict, tmp_path: Path) -> None:
    path = _copy(fp8_reference["small"][1], tmp_path / "c")
    key = EXPERT.format(layer=2, expert=5, proj="gate_proj")
    _rewrite(path, key.replace("weight", "weight_scale_inv"), None)
    with pytest.raises(CheckpointError, match=rf"{key.replace('weight', 'weight_scale_inv')}.*missing"):
        load_experts(path, [(2, 5)])
    head_key = "model.layers.0.linear_attn.out_proj.weight"
    _rewrite(path, head_key.replace("weight", "weight_scale_inv"), None)
    with pytest.raises(CheckpointError, match=rf"{head_key}.*float8_e4m3fn.*no.*weight_scale_inv"):
        load_head(path)


def test_a_scaled_module_in_modules_to_not_convert_is_refused(fp8_reference: dict, tmp_path: Path) -> None:
    path = _copy(fp8_reference["small"][1], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"].append("model.layers.3.self_attn")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.self_attn\.\w+_proj.*modules_to_not_convert"):
        load_head(path)


def test_scales_without_a_quantization_config_are_named(fp8_reference: dict, tmp_path: Path) -> None:
    path = _copy(fp8_reference["small"][1], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weight_scale_inv.*no quantization_config"):
        load_experts(path, [(0, 0)])


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors", "bitsandbytes", None])
def test_an_unsupported_quant_method_is_named_with_what_is_supported(fp8_reference: dict, tmp_path: Path,
                                                                      method: str | None) -> None:
    path = _copy(fp8_reference["small"][2], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"quant_method {method!r} is not supported.*'fp8'") as raised:
        load_head(path)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("change,match", [
    ({"weight_block_size": None}, "weight_block_size is None"),
    ({"weight_block_size": [0, 128]}, r"weight_block_size is \[0, 128\]"),
    ({"activation_scheme": "static"}, "activation_scheme is 'static'"),
    ({"scale_fmt": "ue8m0"}, "scale_fmt is 'ue8m0'"),
])
def test_fp8_configs_not_served_are_named(fp8_reference: dict, tmp_path: Path, change: dict, match: str) -> None:
    path = _copy(fp8_reference["small"][1], tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=match):
        Qwen3NextConfig.from_json(path)
