"""The CLI as a user runs it: make-tiny, generate, plan, quantize-fp8 and bench model; and the mistakes a
user makes (replicas past workers, another model's checkpoint, Redis down or refusing the password, an
empty prompt) as one line with exit status 2, without starting a cluster.

Where the process boundary is the subject, a real `python -m nextserve.cluster.cli` runs: one generate
end to end (a fresh cache, the tiny made on first use, the same bytes as this process's tiny, JSON on
stdout), and one usage error's exit status through sys.exit. Everything else calls
`main([...])` in this process (`run_main`: its return value is the exit status, stdout and stderr captured,
with the WARNING log lines a process's `logging.basicConfig` would print on stderr), so a check of the
CLI's logic does not pay a process's imports."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.cli import up
from nextserve.cluster.cli.main import main
from nextserve.cluster.cli.up import check_redis_reaches_nodes, wait_port_free
from nextserve.cluster.cli.usage import UsageError
from nextserve.cluster.control.redis_server import LocalRedis
from nextserve.model.tiny import TINY_VERSION
from nextserve.model.tiny import TINY_CONFIG

NEXTSERVE = [sys.executable, "-m", "nextserve.cluster.cli"]
ROOT = Path(__file__).resolve().parents[2]

Run = Callable[..., subprocess.CompletedProcess[str]]
"""`_run`, or the `run_main` fixture: (args, env=None) -> CompletedProcess (returncode, stdout, stderr)."""


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m nextserve.cluster.cli ARGS` in a subprocess."""
    return subprocess.run(NEXTSERVE + args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """`main(ARGS)` in this process, as `_run` reports a subprocess: the return value as the exit status,
    what it printed as stdout and stderr (WARNING log records included, as `main`'s basicConfig prints
    them in a process of its own), `env` set for the call."""
    def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        with monkeypatch.context() as patched:
            for key, value in (env or {}).items():
                patched.setenv(key, value)
            handler = logging.StreamHandler(sys.stderr)  # sys.stderr is capsys' now
            handler.setLevel(logging.WARNING)
            logging.getLogger().addHandler(handler)
            try:
                returncode = main(args)
            finally:
                logging.getLogger().removeHandler(handler)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, returncode, out.out, out.err)
    return run


@pytest.fixture(scope="module")
def tiny_reference(tiny_dir: Path) -> PreTrainedModel:
    """transformers' own model on the tiny checkpoint, float32, loaded once for this module."""
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_make_tiny_is_deterministic_and_loads_in_transformers(tiny_dir: Path, tiny_reference: PreTrainedModel,
                                                              tmp_path: Path, run_main: Run) -> None:
    """`make-tiny DIR` writes the session's (the API's) tiny byte for byte; another process writes the same
    bytes too (test_generate_tiny_is_made_on_first_use)."""
    result = run_main(["make-tiny", str(tmp_path / "again")])
    assert result.returncode == 0, result.stderr
    assert _digest(tmp_path / "again") == _digest(tiny_dir)
    assert (tiny_dir / "model.safetensors.index.json").exists()
    assert len(list(tiny_dir.glob("model-*.safetensors"))) > 1
    model = tiny_reference
    assert type(model).__name__ == "Qwen3NextForCausalLM"
    assert model.config.num_experts == 64 and model.config.num_hidden_layers == 8
    assert [t == "full_attention" for t in model.config.layer_types] == [False, False, False, True] * 2
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tok) == TINY_CONFIG["vocab_size"] and tok.eos_token_id == TINY_CONFIG["eos_token_id"]


def test_make_tiny_pads_the_vocabulary_past_the_tokenizer_like_the_real_model(tmp_path: Path, run_main: Run) -> None:
    """--pad-vocab 267: Qwen3-Coder-Next's 151,936 embedding rows for 151,669 tokens, at tiny size; the
    served greedy text equals transformers' on it (generate names nothing past the tokenizer)."""
    result = run_main(["make-tiny", "--pad-vocab", "267", str(tmp_path / "padded")])
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "padded", dtype=torch.float32)
    assert model.config.vocab_size == TINY_CONFIG["vocab_size"] + 267
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 2048 + 267
    assert len(AutoTokenizer.from_pretrained(tmp_path / "padded")) == TINY_CONFIG["vocab_size"]
    generated = run_main(["generate", "--model", str(tmp_path / "padded"), "--max-tokens", "8", "--json", "def main"])
    assert generated.returncode == 0, generated.stderr
    tok = AutoTokenizer.from_pretrained(tmp_path / "padded")
    ids = tok("def main", return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert json.loads(generated.stdout.splitlines()[0])["token_ids"] == want


def test_generate_json_matches_transformers(tiny_dir: Path, tiny_reference: PreTrainedModel, run_main: Run) -> None:
    prompts = ["def fibonacci(n):", "The quick brown fox"]
    result = run_main(["generate", "--model", str(tiny_dir), "--max-tokens", "12", "--json", *prompts])
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ref = tiny_reference
    for line in lines:
        ids = tok(line["prompt"], return_tensors="pt")["input_ids"]
        want = ref.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        assert line["token_ids"] == want
        assert line["text"] == tok.decode(want, skip_special_tokens=True)


def test_generate_tiny_is_made_on_first_use(tiny_dir: Path, tmp_path: Path) -> None:
    """End to end in a process of its own: `python -m nextserve.cluster.cli generate` reads NEXTSERVE_CACHE,
    makes the tiny there (the same bytes as this process's tiny: make_tiny is deterministic across
    processes) and prints JSON."""
    result = _run(["generate", "--model", "tiny", "--max-tokens", "3", "--json", "hi"],
                  env={"NEXTSERVE_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 3
    assert (tmp_path / f"tiny-{TINY_VERSION}" / "config.json").exists()
    assert _digest(tmp_path / f"tiny-{TINY_VERSION}") == _digest(tiny_dir)


def test_generate_bad_input_is_a_clear_error(tiny_dir: Path, tmp_path: Path, run_main: Run) -> None:
    result = run_main(["generate", "--model", str(tmp_path), "x"])
    assert result.returncode == 2 and "no config.json" in result.stderr
    result = run_main(["generate", "--model", str(tiny_dir), "--top-p", "0", "x"])
    assert result.returncode == 2 and "top_p" in result.stderr


def test_plan_prints_the_published_counts(run_main: Run) -> None:
    result = run_main(["plan", "--config", "qwen3-coder-next", "--json"])
    assert result.returncode == 0, result.stderr
    sizes = json.loads(result.stdout)
    assert sizes["total_params"] == 79_674_391_296 and sizes["active_params"] == 3_874_929_408
    assert sizes["mtp_params"] == 1_650_471_424  # the checkpoint's MTP layer, counted on its own
    table = run_main(["plan"]).stdout
    assert "79,674,391,296" in table


def test_bench_model_reports_both_sides(tiny_dir: Path, run_main: Run) -> None:
    result = run_main(["bench", "model", "--model", str(tiny_dir), "--batch", "2", "--prompt-len", "16",
                   "--decode-tokens", "4", "--repeats", "1", "--json"])
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout.splitlines()[-1])
    for key in ("prefill_tok_s", "decode_tok_s", "hf_prefill_tok_s", "hf_decode_tok_s", "prefill_ratio", "decode_ratio"):
        assert r[key] > 0


def _one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status 2 and one stderr line `nextserve: error: ...` holding every fragment; no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nextserve: error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


NO_CLUSTER = {"RAY_ADDRESS": "127.0.0.1:1"}
"""Were a check to let `up` through, it would fail to join this Ray instead of starting one."""


def test_up_with_more_replicas_than_workers_names_both(tiny_dir: Path) -> None:
    """In a process of its own: the usage error's exit status 2 goes through sys.exit, and stderr holds
    that one line (no log line, no traceback)."""
    result = _run(["up", "--model", str(tiny_dir), "--expert-workers", "2", "--expert-replicas", "3",
                   "--redis-url", f"redis://127.0.0.1:{_closed_port()}"], env=NO_CLUSTER)
    _one_line_error(result, "expert_replicas=3 exceeds expert_workers=2", "--expert-workers")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: nothing listens there


@pytest.fixture(scope="module")
def llama_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's config and tokenizer, but config.json says model_type "llama"."""
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    shutil.copytree(tiny_dir, path, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    return path


@pytest.mark.parametrize("command", [["generate", "--model", "{dir}", "hi"], ["plan", "--config", "{dir}"],
                                     ["up", "--model", "{dir}", "--redis-url", "redis://127.0.0.1:{port}"]],
                         ids=lambda c: c[0])
def test_a_checkpoint_of_another_model_is_named(llama_dir: Path, command: list[str], run_main: Run) -> None:
    args = [a.format(dir=llama_dir, port=_closed_port()) for a in command]
    _one_line_error(run_main(args, env=NO_CLUSTER), f"{llama_dir}/config.json", "'model_type' is 'llama'",
                    "'qwen3_next'", "pass a Qwen3-Next checkpoint")


@pytest.mark.parametrize("command", [["status"], ["scale", "--expert-workers", "2"], ["rebalance"]],
                         ids=lambda c: c[0])
def test_redis_down_is_one_line_naming_the_url_without_its_password(command: list[str], run_main: Run) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{_closed_port()}/1"
    line = _one_line_error(run_main([*command, "--redis-url", url]), "is unreachable", "--redis-url",
                           url.replace("s3cret-pw", "***"))
    assert "s3cret-pw" not in line


def test_redis_refusing_the_password_says_so(run_main: Run) -> None:
    with LocalRedis(password="right-pw") as server:  # answering before the CLI asks, on a port it holds
        line = _one_line_error(run_main(["status", "--redis-url", f"redis://:wrong-pw@127.0.0.1:{server.port}/1"]),
                               "refused the credentials", "--redis-url")
        assert "wrong-pw" not in line


def test_generate_refuses_an_empty_prompt_before_loading_anything(tmp_path: Path, run_main: Run) -> None:
    result = run_main(["generate", "--model", str(tmp_path / "absent"), "hello", ""])
    _one_line_error(result, "PROMPT 2 is empty", "nextserve generate")


def test_up_joining_a_ray_cluster_without_redis_url_refuses(tiny_dir: Path, run_main: Run) -> None:
    """A redis-server `up` starts listens on loopback: actors on the other nodes would time out on it."""
    started = time.monotonic()
    result = run_main(["up", "--model", str(tiny_dir)], env=NO_CLUSTER)
    _one_line_error(result, "RAY_ADDRESS=127.0.0.1:1", "--redis-url")
    assert time.monotonic() - started < 60  # refused before starting Redis or joining Ray


def test_a_loopback_redis_is_refused_only_when_a_ray_node_is_on_another_host() -> None:
    check_redis_reaches_nodes("redis://127.0.0.1:6379/0", "10.0.0.5", {"10.0.0.5"})  # one host: it reaches
    check_redis_reaches_nodes("redis://10.0.0.5:6379/0", "10.0.0.5", {"10.0.0.5", "10.0.0.6"})
    for url in ("redis://127.0.0.1:6379/0", "redis://localhost:6379", "redis://[::1]:6379"):
        with pytest.raises(UsageError, match=r"nodes on 10.0.0.6 cannot reach; .*redis://10.0.0.5:6379/0"):
            check_redis_reaches_nodes(url, "10.0.0.5", {"10.0.0.5", "10.0.0.6"})


def test_up_waits_for_its_port_and_names_it_when_it_stays_taken() -> None:
    """A server still listening on --port (another `up`, or one stopping) would make Serve move the gateway
    to another port while `up` waits on this one: `up` waits for it, then refuses naming it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"--port {port} on 127.0.0.1 is in use .*pass another --port"):
            wait_port_free("127.0.0.1", port, timeout_s=0.5)
        releaser = threading.Timer(0.3, taken.close)
        releaser.start()
        wait_port_free("127.0.0.1", port, timeout_s=10)  # free once the listener is gone
        releaser.join()


class _Stop(Exception):
    """Raised by a stubbed Ray call to end `start` once the call is recorded."""


def test_local_up_starts_its_own_ray_and_ctrl_c_deletes_only_its_app(monkeypatch: pytest.MonkeyPatch,
                                                                     tiny_dir: Path, tmp_path: Path) -> None:
    """Without RAY_ADDRESS `up` never attaches to a Ray it discovers; its teardown deletes only its app."""
    calls: list[tuple[str, object]] = []

    def fake_init(**kwargs: object) -> None:
        calls.append(("ray.init", kwargs))
        raise _Stop

    monkeypatch.setattr(up.ray, "init", fake_init)
    monkeypatch.setattr(up.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(up.ray, "shutdown", lambda: calls.append(("ray.shutdown", None)))
    monkeypatch.setattr(up.serve, "delete", lambda name: calls.append(("serve.delete", name)))
    monkeypatch.setattr(up.serve, "shutdown", lambda: calls.append(("serve.shutdown", None)))
    monkeypatch.setattr(up, "get_or_create_controller", lambda *a: (_ for _ in ()).throw(_Stop()))
    options = up.UpOptions(app=AppArgs(model=str(tiny_dir), admin_token="t"), host="127.0.0.1", port=1, ray_address=None,
                           state_file=tmp_path / "state.json", direct_ingress=False)
    with pytest.raises(_Stop):
        up.start(options, options.app, "redis://127.0.0.1:1")
    assert calls[0][0] == "ray.init" and calls[0][1]["address"] == "local"  # type: ignore[index]
    calls.clear()
    with pytest.raises(_Stop):
        up.stop(options, "redis://127.0.0.1:1", None)
    assert calls == [("serve.delete", up.APP_NAME), ("ray.shutdown", None)]


def test_quantize_fp8_writes_the_checkpoint_and_twin_the_fixture_holds(tiny_dir: Path, tiny_fp8: tuple[Path, Path],
                                                                        tmp_path: Path, run_main: Run) -> None:
    """`nextserve quantize-fp8 TINY DST --block 128 --twin TWIN` gives, byte for byte, the session's tiny_fp8
    (made through the API)."""
    result = run_main(["quantize-fp8", str(tiny_dir), str(tmp_path / "fp8"), "--block", "128",
                   "--twin", str(tmp_path / "twin")])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "fp8"), str(tmp_path / "twin")]
    assert _digest(tmp_path / "fp8") == _digest(tiny_fp8[0]) and _digest(tmp_path / "twin") == _digest(tiny_fp8[1])
    _one_line_error(run_main(["quantize-fp8", str(tmp_path / "fp8"), str(tmp_path / "again")]), "already quantized")


def test_generate_on_fp8_equals_transformers_on_its_twin(tiny_fp8: tuple[Path, Path], run_main: Run) -> None:
    fp8, twin = tiny_fp8
    prompts = ["def fibonacci(n):", "The quick brown fox"]
    result = run_main(["generate", "--model", str(fp8), "--max-tokens", "12", "--json", *prompts])
    assert result.returncode == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(twin)
    ref = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32)
    for line in map(json.loads, result.stdout.splitlines()):
        ids = tok(line["prompt"], return_tensors="pt")["input_ids"]
        assert line["token_ids"] == ref.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()


def test_up_names_an_fp8_checkpoint_it_cannot_load_as_generate_does(tiny_fp8: tuple[Path, Path],
                                                                   tmp_path: Path, run_main: Run) -> None:
    """A misshaped expert scale: `up` checks the checkpoint before deploying and prints generate's line."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_fp8[0], bad)
    key = "model.layers.5.mlp.experts.7.down_proj.weight_scale_inv"
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = torch.ones(1, 1)
    save_file(tensors, shard, metadata={"format": "pt"})
    line = _one_line_error(run_main(["generate", "--model", str(bad), "hi"]), key, "(1, 1)", "needs (2, 1)")
    up_line = _one_line_error(run_main(["up", "--model", str(bad), "--redis-url",
                                        f"redis://127.0.0.1:{_closed_port()}"], env=NO_CLUSTER))
    assert up_line == line
