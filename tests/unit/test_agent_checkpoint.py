"""The agent checkpoint: transformers' greedy decoding reproduces every memorised agent turn, token for token."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from agent_checkpoint import (  # noqa: F401  (agent_checkpoint_dir is the session fixture)
    AGENT_TURNS,
    AgentTurn,
    END_OF_TURN,
    MARKER,
    agent_checkpoint_dir,
    agent_version,
    built_once,
    checkpoint_completions,
    ensure_agent_checkpoint,
    prompt_text,
)
from nextserve.model.tiny import TINY_CONFIG
from nextserve.model.tiny_tokenizer import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def agent_tokenizer(agent_checkpoint_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(agent_checkpoint_dir)


@pytest.fixture(scope="module")
def completions(agent_checkpoint_dir: Path) -> dict[str, list[int]]:
    """transformers' greedy completions on the checkpoint (computed once per session: by its build or here)."""
    return checkpoint_completions(agent_checkpoint_dir)


@pytest.mark.parametrize("turn", AGENT_TURNS, ids=lambda t: t.name)
def test_greedy_generate_reproduces_the_turn(turn: AgentTurn, agent_tokenizer: PreTrainedTokenizerBase,
                                             completions: dict[str, list[int]]) -> None:
    want = agent_tokenizer.encode(turn.completion, add_special_tokens=False)
    assert completions[turn.name] == want
    assert want[-1] == agent_tokenizer.eos_token_id == TINY_CONFIG["eos_token_id"]
    assert agent_tokenizer.decode(completions[turn.name], skip_special_tokens=True) == turn.content


def test_weather_call_decodes_to_the_tool_call_block(agent_tokenizer: PreTrainedTokenizerBase,
                                                     completions: dict[str, list[int]]) -> None:
    text = agent_tokenizer.decode(completions["weather_call"], skip_special_tokens=True)
    assert text == ("Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n"
                    "</tool_call>")
    assert agent_tokenizer.decode(completions["weather_call"]).endswith("</tool_call>" + END_OF_TURN)


def test_forced_prefixes_continue_the_same_call(agent_tokenizer: PreTrainedTokenizerBase) -> None:
    """The forced prompts are the unforced Rome prompt plus the prefix a server appends for tool_choice."""
    turns = {t.name: t for t in AGENT_TURNS}
    plain = prompt_text(agent_tokenizer, turns["rome_without_tool"])
    assert plain.endswith("<|im_start|>assistant\n")
    assert prompt_text(agent_tokenizer, turns["forced_required"]) == plain + "<tool_call>\n<function="
    assert prompt_text(agent_tokenizer, turns["forced_named"]) == plain + "<tool_call>\n<function=get_weather>\n"
    assert ("<tool_call>\n<function=" + turns["forced_required"].completion
            == "<tool_call>\n<function=get_weather>\n" + turns["forced_named"].completion)


def test_checkpoint_layout_and_cache(agent_checkpoint_dir: Path) -> None:
    config = json.loads((agent_checkpoint_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["max_position_embeddings"] == TINY_CONFIG["max_position_embeddings"]
    assert (agent_checkpoint_dir / "model.safetensors.index.json").exists()
    assert (agent_checkpoint_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert (agent_checkpoint_dir / MARKER).read_text().splitlines()[0] == agent_version()
    assert agent_checkpoint_dir.name == f"tiny-agent-{agent_version()}"
    assert ensure_agent_checkpoint(agent_checkpoint_dir.parent) == agent_checkpoint_dir  # cached: no rebuild


def test_built_once_builds_once_when_two_ask_at_the_same_time(tmp_path: Path) -> None:
    """Two callers (two pytest-xdist workers on a fresh cache; threads here, each with its own lock file
    handle): the second waits for the first's build and returns it instead of building again."""
    builds: list[Path] = []
    started = threading.Event()

    def build(out: Path, work: Path) -> None:
        builds.append(out)
        started.set()
        time.sleep(0.5)  # still building when the second caller arrives
        out.mkdir()
        (out / "MARK").write_text("done")

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(built_once, tmp_path / "ckpt", "MARK", build)
        assert started.wait(10)
        second = pool.submit(built_once, tmp_path / "ckpt", "MARK", build)
        assert first.result() == second.result() == tmp_path / "ckpt"
    assert len(builds) == 1 and (tmp_path / "ckpt" / "MARK").read_text() == "done"
