"""A tiny checkpoint that has memorised a few agent turns, for the tool-call tests of the gateway.

A random-weight model never emits a tool call. This module trains the tiny default until greedy decoding
reproduces, token for token, the completion of each `AGENT_TURNS` scenario after its prompt: the tokenizer's chat
template rendered with `tools=TOOLS` and the generation prompt, then the scenario's `tool_choice_prefix` (text a
server appends to force a call), then `completion`, which ends with the end-of-turn token `<|im_end|>` (the eos,
id 2, that generation stops on).

    path = ensure_agent_checkpoint(cache_root)   # built once, cached under cache_root / f"tiny-agent-{VERSION}"

Training is AdamW on the weights after the last layer's keys and values (~100 steps, seconds on 2 cores, see
`_LastLayerTrainer`), stopped when every completion token wins greedy decoding by a margin of MIN_MARGIN logits
with the weights in bfloat16; the checkpoint is saved in bfloat16 like the tiny (same layout, tokenizer and
generation config) and checked with transformers' own greedy `generate`, in float32 (what the engine loads by
default); bfloat16 compute reproduces the turns too. The scenarios are data, importable by other tests;
`prompt_text(tokenizer, turn)` is the exact prompt text.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, Qwen3NextForCausalLM
from transformers.models.qwen3_next.modeling_qwen3_next import apply_rotary_pos_emb, repeat_kv

from nextserve.model.tiny import TINY_SHARD_SIZE, TINY_VERSION, make_tiny
from nextserve.model.tiny_tokenizer import CHAT_TEMPLATE

log = logging.getLogger(__name__)

END_OF_TURN = "<|im_end|>"
"""The tiny's eos (id 2): every completion ends with it, and generation stops on it."""

# ---------------------------------------------------------------------------------------------- scenarios

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the weather forecast for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "days": {"type": "integer", "description": "Number of days to forecast (1-7)"},
            "metric": {"type": "boolean", "description": "Celsius if true, Fahrenheit if false"},
        }, "required": ["city", "days", "metric"]},
    }},
    {"type": "function", "function": {
        "name": "run_python",
        "description": "Run Python code and return its standard output.",
        "parameters": {"type": "object", "properties": {
            "code": {"type": "string", "description": "The code to run"},
        }, "required": ["code"]},
    }},
    {"type": "function", "function": {
        "name": "search_files",
        "description": "Search files for a regular expression.",
        "parameters": {"type": "object", "properties": {
            "pattern": {"type": "string", "description": "The regular expression"},
            "paths": {"type": "array", "items": {"type": "string"}, "description": "Files or folders to search"},
            "max_results": {"type": ["integer", "null"], "description": "At most this many matches (null: all)"},
        }, "required": ["pattern", "paths"]},
    }},
]
"""Every scenario offers the same tools (in OpenAI's format), so all share one system turn."""

SYSTEM = {"role": "system", "content": "You are a coding agent. Use the tools when they help."}


def call_block(name: str, arguments: dict[str, str]) -> str:
    """One `<tool_call>` block in Qwen3-Coder's format; `arguments` maps names to their rendered values."""
    params = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


@dataclass(frozen=True)
class AgentTurn:
    """One memorised turn: after `messages` (and `tool_choice_prefix`), greedy decoding gives `completion`."""

    name: str
    messages: list[dict[str, Any]]
    """OpenAI chat messages; an assistant's `tool_calls` carry `arguments` as dicts (as the gateway renders them)."""
    completion: str
    """The exact text the model produces after the prompt, ending with END_OF_TURN."""
    tool_choice_prefix: str | None = None
    """Text appended to the rendered prompt (after `<|im_start|>assistant\\n`) before generating, as a server
    does to force a tool call: `<tool_call>\\n<function=NAME>\\n` (named) or `<tool_call>\\n<function=` (required)."""
    tools: list[dict[str, Any]] = field(default_factory=lambda: TOOLS)

    @property
    def content(self) -> str:
        """The completion as `decode(..., skip_special_tokens=True)` shows it (without END_OF_TURN)."""
        return self.completion.removesuffix(END_OF_TURN)


WEATHER_QUESTION = {"role": "user", "content": "What's the weather in Paris for the next 3 days? Use Celsius."}
WEATHER_CALL = call_block("get_weather", {"city": "Paris", "days": "3", "metric": "true"})
WEATHER_RESULT = json.dumps({"city": "Paris", "forecast": ["sunny", "sunny", "cloudy"], "temp_c": 21})
ROME_QUESTION = {"role": "user", "content": "How warm will it be in Rome this week?"}
ROME_ARGUMENTS = {"city": "Rome", "days": "7", "metric": "true"}
CODE = 'print("</parameter>")\nprint(2 ** 10)'

AGENT_TURNS: list[AgentTurn] = [
    AgentTurn("weather_call", [SYSTEM, WEATHER_QUESTION], f"Let me check.\n{WEATHER_CALL}{END_OF_TURN}"),
    AgentTurn("after_tool_result", [
        SYSTEM, WEATHER_QUESTION,
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": True}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": WEATHER_RESULT},
    ], f"It will be sunny in Paris, 21°C.{END_OF_TURN}"),
    AgentTurn("parallel_calls", [
        SYSTEM, {"role": "user", "content": "Compare tomorrow's weather in Tokyo and Oslo, in Celsius."},
    ], call_block("get_weather", {"city": "Tokyo", "days": "1", "metric": "true"}) + "\n"
       + call_block("get_weather", {"city": "Oslo", "days": "1", "metric": "true"}) + END_OF_TURN),
    AgentTurn("code_value", [
        SYSTEM, {"role": "user", "content": "Print the closing parameter tag from Python, then 2 ** 10."},
    ], call_block("run_python", {"code": CODE}) + END_OF_TURN),
    AgentTurn("search_call", [
        SYSTEM, {"role": "user", "content": "Find every TODO in src and tests."},
    ], call_block("search_files", {"pattern": "TODO", "paths": '["src", "tests"]', "max_results": "null"})
       + END_OF_TURN),
    AgentTurn("forced_named", [SYSTEM, ROME_QUESTION],
              call_block("get_weather", ROME_ARGUMENTS).removeprefix("<tool_call>\n<function=get_weather>\n")
              + END_OF_TURN, tool_choice_prefix="<tool_call>\n<function=get_weather>\n"),
    AgentTurn("forced_required", [SYSTEM, ROME_QUESTION],
              call_block("get_weather", ROME_ARGUMENTS).removeprefix("<tool_call>\n<function=") + END_OF_TURN,
              tool_choice_prefix="<tool_call>\n<function="),
    AgentTurn("rome_without_tool", [SYSTEM, ROME_QUESTION],
              f"Rome will be warm this week, around 25°C.{END_OF_TURN}"),
]
"""The memorised turns. `rome_without_tool` is the Rome prompt unforced (a plain answer), so a test can show
that `tool_choice` named / required (the two forced prefixes) is what makes the model call."""


def prompt_text(tokenizer: Any, turn: AgentTurn) -> str:
    """The rendered prompt (generation prompt included) followed by the turn's forced prefix, if any."""
    text = tokenizer.apply_chat_template(turn.messages, tools=turn.tools, add_generation_prompt=True,
                                         tokenize=False)
    return str(text) + (turn.tool_choice_prefix or "")


# ---------------------------------------------------------------------------------------------- training

AGENT_REVISION = 3
"""Bump when the training code changes (the scenarios and the constants below enter the version by value)."""
SEED = 20261130
LEARNING_RATE = 2e-3
MAX_STEPS = 600
MIN_MARGIN = 3.0
"""Training stops when, with the trained weights rounded to bfloat16, every completion token's logit beats every
other token's by this much (teacher-forced): enough that fp32 and bf16 forwards agree on the greedy choice."""
MARKER = "NEXTSERVE_TINY_AGENT"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def agent_version() -> str:
    """Changes whenever the tiny model, the scenarios or the training change (the cache key)."""
    spec = {"revision": AGENT_REVISION, "tiny": TINY_VERSION, "seed": SEED, "lr": LEARNING_RATE,
            "max_steps": MAX_STEPS, "min_margin": MIN_MARGIN, "template": CHAT_TEMPLATE,
            "turns": [[t.name, t.tools, t.messages, t.tool_choice_prefix, t.completion] for t in AGENT_TURNS]}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"{TINY_VERSION}-{digest[:12]}"


@dataclass(frozen=True)
class _Sample:
    turn: AgentTurn
    prompt_ids: list[int]
    completion_ids: list[int]


def _samples(tokenizer: Any) -> list[_Sample]:
    """Each turn's prompt and completion ids, checked to be how the whole text tokenizes (no merge across)."""
    out = []
    for turn in AGENT_TURNS:
        prompt = prompt_text(tokenizer, turn)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        completion_ids = tokenizer.encode(turn.completion, add_special_tokens=False)
        if tokenizer.encode(prompt + turn.completion, add_special_tokens=False) != prompt_ids + completion_ids:
            raise RuntimeError(f"{turn.name}: prompt and completion tokenize differently apart and together")
        if completion_ids[-1] != tokenizer.eos_token_id:
            raise RuntimeError(f"{turn.name}: the completion must end with the eos {tokenizer.eos_token!r}")
        out.append(_Sample(turn, prompt_ids, completion_ids))
    return out


def _margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row: the target's logit minus the best other token's (> 0: greedy picks the target)."""
    right = logits.gather(1, targets[:, None])[:, 0]
    return right - logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values


def _last_layer_inputs(model: Qwen3NextForCausalLM, seqs: list[list[int]]
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One forward of all sequences, right-padded (causal mixers keep the padding out of every real position):
    the last layer's input hidden states [B, T, H], its rotary (cos, sin) [1, T, rot] and the logits [B, T, V]."""
    width = max(map(len, seqs))
    batch = torch.tensor([ids + [model.config.pad_token_id] * (width - len(ids)) for ids in seqs])
    captured: dict[str, Any] = {}

    def capture(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["cos_sin"] = kwargs["position_embeddings"]

    hook = model.model.layers[-1].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(input_ids=batch).logits
    finally:
        hook.remove()
    cos, sin = captured["cos_sin"]
    return captured["x"], (cos[:1], sin[:1]), logits  # every row has positions 0..T-1


@dataclass(frozen=True)
class _Frozen:
    """What one sample's completion positions see of the frozen weights in the last layer."""

    x: torch.Tensor  # [n, H] the layer's input (the residual) at the n positions that predict completion tokens
    normed: torch.Tensor  # [n, H] input_layernorm(x)
    cos: torch.Tensor  # [1, n, rot]
    sin: torch.Tensor
    k: torch.Tensor  # [1, heads, T, hd] keys (normed, rotated, repeated per query group) of the whole sequence
    v: torch.Tensor  # [1, heads, T, hd]
    mask: torch.Tensor  # [n, T] causal: position p sees keys 0..p


class _LastLayerTrainer:
    """Memorises the completions by training only what comes after the last layer's keys and values.

    The last decoder layer is full attention. Its input and its keys and values depend only on frozen weights, so
    they come once from transformers' own forward; each step then runs, on the completion positions only, the
    query and output projections and attention, the router and shared expert of the MoE block (its routed experts
    stay frozen: their weight gradient is slow on CPU), the final norm and the lm_head: milliseconds, not a
    forward of every prompt token. The logits are transformers' (checked once against the full forward).
    """

    def __init__(self, model: Qwen3NextForCausalLM, samples: list[_Sample]) -> None:
        self.model, self.layer = model, model.model.layers[-1]
        if model.config.layer_types[-1] != "full_attention":
            raise RuntimeError("the last layer of the tiny model must be full attention")
        attn, mlp = self.layer.self_attn, self.layer.mlp
        self.trained = [attn.q_proj, attn.q_norm, attn.o_proj, self.layer.post_attention_layernorm, mlp.gate,
                        mlp.shared_expert, mlp.shared_expert_gate, model.model.norm, model.lm_head]
        seqs = [s.prompt_ids + s.completion_ids for s in samples]
        x, (cos, sin), logits = _last_layer_inputs(model, seqs)
        self.frozen, reference = [], []
        with torch.no_grad():
            for i, ids in enumerate(seqs):
                n, T = len(samples[i].completion_ids), len(ids)
                pos = torch.arange(T - n - 1, T - 1)  # where the completion tokens are predicted
                normed = self.layer.input_layernorm(x[i, :T])
                k = attn.k_norm(attn.k_proj(normed).view(T, -1, attn.head_dim)).transpose(0, 1)[None]
                v = attn.v_proj(normed).view(T, -1, attn.head_dim).transpose(0, 1)[None]
                _, k = apply_rotary_pos_emb(k, k, cos[:, :T], sin[:, :T])
                groups = attn.num_key_value_groups
                self.frozen.append(_Frozen(x[i, pos], normed[pos], cos[:, pos], sin[:, pos], repeat_kv(k, groups),
                                           repeat_kv(v, groups), torch.arange(T)[None, :] <= pos[:, None]))
                reference.append(logits[i, pos])
            self.targets = torch.tensor([t for s in samples for t in s.completion_ids])
            diff = (self.logits() - torch.cat(reference)).abs().max().item()
        if diff > 1e-3:
            raise RuntimeError(f"the last-layer training path differs from transformers' forward by {diff:.2e}; "
                               "has Qwen3NextAttention or Qwen3NextDecoderLayer changed?")

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.trained for p in m.parameters()]

    def logits(self) -> torch.Tensor:
        """[completion tokens of all samples, vocab]: the model's logits where each completion token is predicted."""
        attn, hidden = self.layer.self_attn, []
        for f in self.frozen:
            n = f.x.shape[0]
            q, gate = torch.chunk(attn.q_proj(f.normed).view(n, -1, attn.head_dim * 2), 2, dim=-1)
            q, _ = apply_rotary_pos_emb(*[attn.q_norm(q).transpose(0, 1)[None]] * 2, f.cos, f.sin)
            out = F.scaled_dot_product_attention(q, f.k, f.v, attn_mask=f.mask, scale=attn.scaling)
            out = out[0].transpose(0, 1).reshape(n, -1) * torch.sigmoid(gate.reshape(n, -1))
            hidden.append(f.x + attn.o_proj(out))
        h = torch.cat(hidden)[None]
        mlp = self.layer.mlp(self.layer.post_attention_layernorm(h))
        h = h + (mlp[0] if isinstance(mlp, tuple) else mlp)
        return self.model.lm_head(self.model.model.norm(h))[0]

    def bf16_margins(self) -> torch.Tensor:
        """The margins with the trained weights rounded to bfloat16, as the checkpoint stores them."""
        params = self.parameters()
        with torch.no_grad():
            saved = [p.clone() for p in params]
            for p in params:
                p.copy_(p.to(torch.bfloat16))
            margins = _margins(self.logits(), self.targets)
            for p, kept in zip(params, saved):
                p.copy_(kept)
        return margins

    def train(self) -> int:
        """AdamW until every margin, in fp32 and bf16, reaches MIN_MARGIN; returns the number of steps."""
        self.model.requires_grad_(False)
        params = self.parameters()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
        for step in range(1, MAX_STEPS + 1):
            logits = self.logits()
            loss = F.cross_entropy(logits, self.targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            margin = _margins(logits.detach(), self.targets).min().item()  # before this step's update
            if step % 25 == 0:
                log.info("step %d: loss %.4f, min margin %.2f", step, loss.item(), margin)
            if margin >= MIN_MARGIN and self.bf16_margins().min().item() >= MIN_MARGIN:
                return step
        raise RuntimeError(f"the agent turns were not memorised in {MAX_STEPS} steps "
                           f"(min margin {self.bf16_margins().min().item():.2f} < {MIN_MARGIN})")


# ---------------------------------------------------------------------------------------------- build, cache, check


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Train and check on one CPU thread. Training is then bit-reproducible (two-thread backward passes differ
    in the last bits from run to run, which Adam amplifies into different weights), and the many small ops of
    `generate` stay fast on shared cores: with two threads they ran 25x slower (225 s against 8 s) while another
    process used the second core; on idle cores one thread costs ~1.5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def greedy_completions(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, list[int]]:
    """Per turn: the token ids transformers' greedy `generate` gives after its prompt, up to the first eos.

    One batch, left-padded under an attention mask (DeltaNet layers zero the padding's inputs, so it leaves no
    state): several times faster than one call per turn, and the same tokens (checked).
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = Qwen3NextForCausalLM.from_pretrained(path, dtype=dtype).eval()
    samples = _samples(tokenizer)
    width = max(len(s.prompt_ids) for s in samples)
    pad = [width - len(s.prompt_ids) for s in samples]
    ids = torch.tensor([[tokenizer.pad_token_id] * n + s.prompt_ids for n, s in zip(pad, samples)])
    mask = torch.tensor([[0] * n + [1] * len(s.prompt_ids) for n, s in zip(pad, samples)])
    with torch.no_grad(), _one_thread():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max(len(s.completion_ids) for s in samples) + 8)
    completions = {}
    for s, row in zip(samples, out[:, width:].tolist()):
        eos = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        completions[s.turn.name] = row[:eos]
    return completions


def check_agent_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, list[int]]:
    """Raise unless greedy decoding reproduces every turn's completion token for token; the completions."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    want = {s.turn.name: s.completion_ids for s in _samples(tokenizer)}
    got = greedy_completions(path, dtype)
    bad = [f"{name}: wanted {tokenizer.decode(want[name])!r}, got {tokenizer.decode(got[name])!r}"
           for name in want if got[name] != want[name]]
    if bad:
        raise RuntimeError(f"the agent checkpoint at {path} ({dtype}) does not reproduce its turns:\n"
                           + "\n".join(bad))
    return got


_BUILT_COMPLETIONS: dict[str, dict[str, list[int]]] = {}
"""agent_version() -> the float32 greedy completions `_build`'s check computed in this process, on the very
files it then moved into the cache."""


def checkpoint_completions(path: Path) -> dict[str, list[int]]:
    """transformers' float32 greedy completions (greedy_completions) of the agent checkpoint at `path`: the
    ones its build computed when this process built it (the same run on the same files: a fresh cache pays
    the ~1,000-token batched `generate` once, not twice), else computed now."""
    marker = path / MARKER
    version = marker.read_text().splitlines()[0] if marker.exists() else None
    if version in _BUILT_COMPLETIONS:
        return _BUILT_COMPLETIONS[version]
    return greedy_completions(path)


def _build(out: Path, work: Path, tiny: Path | None = None) -> None:
    """Train the agent turns into `tiny` (the tiny checkpoint of TINY_VERSION; None: one made under `work`)."""
    start = time.perf_counter()
    base = tiny or make_tiny(work / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = Qwen3NextForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    torch.manual_seed(SEED)
    trainer = _LastLayerTrainer(model, _samples(tokenizer))
    steps = trainer.train()
    trained = time.perf_counter()
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=TINY_SHARD_SIZE)
    for name in COPIED_FILES:
        shutil.copyfile(base / name, out / name)
    completions = check_agent_checkpoint(out)
    log.info("built the agent checkpoint in %.1f s (%d steps, %.1f s to train, %.1f s to check)",
             time.perf_counter() - start, steps, trained - start, time.perf_counter() - trained)
    (out / MARKER).write_text(f"{agent_version()}\nsteps={steps}\n")
    _BUILT_COMPLETIONS[agent_version()] = completions


def ensure_agent_checkpoint(cache_root: Path, tiny: Callable[[], Path] | None = None) -> Path:
    """The agent checkpoint under `cache_root / f"tiny-agent-{agent_version()}"`, built on first use from
    `tiny()` (a tiny checkpoint of TINY_VERSION, asked for only when building; None: one made for it)."""
    return built_once(Path(cache_root) / f"tiny-agent-{agent_version()}", MARKER,
                      lambda out, work: _build(out, work, tiny() if tiny else None))


def built_once(path: Path, marker: str, build: Callable[[Path, Path], None]) -> Path:
    """`path`, made by `build(out, work)` (on one torch thread) unless it is there already (its `marker` file
    written last by `build`); built in a scratch folder beside it and moved in at once, so concurrent test
    processes never see half a checkpoint, and under an exclusive lock (`.NAME.lock` beside it), so a second
    process (a pytest-xdist worker) waits for the first's build instead of training the same one again."""
    if (path / marker).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (path / marker).exists():  # built by the process that held the lock
            return path
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            with _one_thread():
                build(work / "out", work)
            try:
                os.replace(work / "out", path)
            except OSError:  # a process without the lock (an older checkout) finished first: keep its copy
                if not (path / marker).exists():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return path


def cache_root() -> Path:
    """$NEXTSERVE_CACHE if set (as the CLI's tiny uses), else the repository's git-ignored `.cache/`."""
    if os.environ.get("NEXTSERVE_CACHE"):
        return Path(os.environ["NEXTSERVE_CACHE"])
    return Path(__file__).resolve().parents[1] / ".cache"


@pytest.fixture(scope="session")
def agent_checkpoint_dir(request: pytest.FixtureRequest) -> Path:
    """The agent checkpoint (built once per cache: ~30 s on 2 idle cores, up to ~3 min on busy ones), from the
    session's tiny checkpoint (`tiny_dir`, made only if a build needs it)."""
    return ensure_agent_checkpoint(cache_root(), lambda: Path(request.getfixturevalue("tiny_dir")))
