"""`nextserve up`'s flags are AppArgs' fields (cluster/cli/field_flags.py): `up --help` read against AppArgs
(every field a flag of the same name, with its docstring and its default), and what the flags parse into."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict

from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.cli.up import app_args_of
from nextserve.cluster.cli.field_flags import add_field_flags, field_values
from nextserve.cluster.cli.main import build_parser, main
from nextserve.cluster.cli.usage import UsageError
from nextserve.model.cache.budget import CacheConfig, GiB
from nextserve.model.tiny import TINY_VERSION

NOT_FLAGS = {"admin_token"}
"""AppArgs fields that are secrets, so not flags (a command line shows in `ps`)."""


def _up_help(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """`nextserve up --help` as the CLI prints it (main, in this process), one option per line (COLUMNS)."""
    monkeypatch.setenv("COLUMNS", "4000")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["up", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _option_blocks(help_text: str) -> dict[str, str]:
    """--help's options section -> {each flag of an option: that option's help, whitespace collapsed}."""
    options = help_text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    blocks: dict[str, str] = {}
    for block in re.split(r"\n(?=  -)", options):
        invocation, _, text = block.strip().partition("  ")
        for flag in re.findall(r"--[a-z0-9-]+", invocation):
            blocks[flag] = " ".join(text.split())
    return blocks


def _shown(value: object) -> str:
    return "''" if value == "" else str(value)


def test_up_help_has_every_app_args_field_as_a_flag_of_its_name_with_help_and_default(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    help_text = _up_help(capsys, monkeypatch)
    blocks = _option_blocks(help_text)
    for name, field in AppArgs.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name in NOT_FLAGS:
            assert flag not in blocks, name
            continue
        assert flag in blocks, f"{name}: no {flag} in `up --help`"
        assert field.description, f"{name} has no docstring"
        default = "tiny" if name == "model" else field.default
        assert blocks[flag] == f"{' '.join(field.description.split())} (default: {_shown(default)})", name
        if field.annotation is bool:
            assert "--no-" + flag[2:] in blocks, name
    assert set(NOT_FLAGS) == {n for n, f in AppArgs.model_fields.items() if f.json_schema_extra}
    epilog = help_text.split("\n\n")[-1]
    assert "admin_token (not a flag)" in epilog and "--admin-token-env" in epilog  # how to give it instead
    for flag, text in blocks.items():  # up's own options (--host, --port, --direct-ingress) show theirs too
        assert flag == "--help" or "(default: " in text, flag


def test_defaults_are_the_scheduler_and_cache_configs() -> None:
    fields = AppArgs.model_fields
    assert [fields[n].default for n in ("max_num_seqs", "max_tokens_per_step", "prefill_chunk")] == [64, 512, 256]
    assert fields["cache_memory"].default == "4GiB" and CacheConfig().cache_memory_bytes == 4 * GiB
    assert [fields[n].default for n in ("block_size", "enable_prefix_cache", "prefix_snapshot_every")] == \
        [CacheConfig.block_size, CacheConfig.enable_prefix_cache, CacheConfig.prefix_snapshot_every]


def _up(argv: list[str], environ: dict[str, str] | None = None) -> AppArgs:
    return app_args_of(build_parser().parse_args(["up", *argv]), environ or {})


def test_flags_parse_into_app_args_and_flags_left_off_keep_its_defaults(tiny_dir: Path) -> None:
    app = _up(["--model", str(tiny_dir), "--micro-batches", "2", "--no-enable-prefix-cache", "--head-num-gpus",
               "0.5", "--dtype", "bfloat16", "--max-experts-per-worker", "40", "--cache-memory", "512MiB",
               "--max-tokens-per-step", "128", "--prefill-chunk", "32"])
    assert (app.micro_batches, app.enable_prefix_cache, app.head_num_gpus, app.dtype) == (2, False, 0.5, "bfloat16")
    assert (app.max_experts_per_worker, app.cache_memory, app.max_tokens_per_step, app.prefill_chunk) == \
        (40, "512MiB", 128, 32)
    defaults = _up(["--model", str(tiny_dir)])
    left_off = {"model", "admin_token"}
    assert defaults.model_dump(exclude=left_off) == AppArgs(model=str(tiny_dir)).model_dump(exclude=left_off)
    assert defaults.admin_token and defaults.admin_token != _up(["--model", str(tiny_dir)]).admin_token  # fresh
    assert _up(["--model", str(tiny_dir), "--micro-batches", "auto"]).micro_batches == "auto"


@pytest.mark.parametrize("argv, message", [(["--micro-batches", "two"], "expected 'auto' or int, got 'two'"),
                                           (["--dtype", "float16"], "invalid choice: 'float16'"),
                                           (["--admin-token", "x"], "unrecognized arguments: --admin-token"),
                                           (["--expert-workers", "2.5"], "invalid int value: '2.5'")])
def test_a_bad_flag_value_is_refused_naming_the_flag(argv: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["up", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_secrets_come_from_the_environment(tiny_dir: Path) -> None:
    model = ["--model", str(tiny_dir)]
    assert _up(model, {"NEXTSERVE_API_KEY": "k"}).api_key == "k"
    assert _up([*model, "--api-key", "flag"], {"NEXTSERVE_API_KEY": "k"}).api_key == "flag"
    app = _up([*model, "--admin-token-env", "TOK", "--redis-url", "redis://r:1/0", "--redis-password-env", "PW"],
              {"TOK": "t0ken", "PW": "pw"})
    assert (app.admin_token, app.admin_token_env, app.redis_url) == ("t0ken", None, "redis://:pw@r:1/0")
    with pytest.raises(UsageError, match="admin_token_env='TOK' is not set"):
        _up([*model, "--admin-token-env", "TOK"])


def test_tiny_is_the_model_default_and_its_name(tiny_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`tiny` resolves in the cache (NEXTSERVE_CACHE), where the session's tiny stands (made on first use:
    tests/process/test_cli.py's test_generate_tiny_is_made_on_first_use)."""
    (tmp_path / f"tiny-{TINY_VERSION}").symlink_to(tiny_dir, target_is_directory=True)
    monkeypatch.setenv("NEXTSERVE_CACHE", str(tmp_path))
    app = _up([])
    assert app.served_model_name() == "tiny" and Path(app.model).parent == tmp_path
    assert _up(["--model-name", "other"]).served_model_name() == "other"


class _Kinds(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    count: int | None = None
    """A count; None: unbounded."""
    mode: int | Literal["auto", "off"] = "auto"
    """A count, auto or off."""
    ratio: float = 0.5
    """A 100% ratio."""
    on: bool = False
    """A switch."""


def test_each_annotation_kind_parses_to_its_type() -> None:
    parser = argparse.ArgumentParser()
    add_field_flags(parser, _Kinds)
    assert field_values(parser.parse_args([]), _Kinds) == {}
    args = parser.parse_args(["--count", "3", "--mode", "off", "--ratio", "0.25", "--on"])
    assert field_values(args, _Kinds) == {"count": 3, "mode": "off", "ratio": 0.25, "on": True}
    assert field_values(parser.parse_args(["--mode", "7", "--no-on"]), _Kinds) == {"mode": 7, "on": False}
    assert "A 100% ratio. (default: 0.5)" in parser.format_help().replace("\n", " ").replace("  ", " ")


def test_a_field_without_a_docstring_or_a_flag_form_is_refused_at_build() -> None:
    class Undocumented(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)
        count: int = 1

    class Nested(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)
        sizes: list[int] = []
        """Sizes."""

    with pytest.raises(TypeError, match="field count has no docstring"):
        add_field_flags(argparse.ArgumentParser(), Undocumented)
    with pytest.raises(TypeError, match="field sizes: list\\[int\\] has no flag form"):
        add_field_flags(argparse.ArgumentParser(), Nested)
