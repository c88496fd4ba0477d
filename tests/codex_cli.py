"""The real Codex CLI (npm `@openai/codex`), installed once into the test cache, pointed at a gateway.

    codex = ensure_codex(cache_root)            # cache_root / f"codex-{CODEX_VERSION}"; skips (saying why)
                                                # where npm or the npm registry is unavailable
    result = run_codex_exec(codex, base_url, workdir, "Say hello.")

`run_codex_exec` writes a CODEX_HOME of its own whose config.toml names a custom model provider
(`wire_api = "responses"`, `base_url` at the gateway's /v1, `env_key` naming the variable with the API key;
no retries, so a failure shows at once) and runs one non-interactive turn: `codex exec`. The keys are
Codex's documented config.toml keys (checked against `codex exec --help` of this version).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CODEX_VERSION = "0.171.0"
"""The version the tests ran with (what issue 24 measured against)."""
INSTALL_TIMEOUT_S = 600
API_KEY_ENV = "NEXTSERVE_CODEX_KEY"


def ensure_codex(cache_root: Path) -> Path:
    """The codex executable under `cache_root / f"codex-{CODEX_VERSION}"`, installed from npm on first use;
    the test is skipped (with the reason) when npm or its registry is not reachable."""
    prefix = Path(cache_root) / f"codex-{CODEX_VERSION}"
    codex = prefix / "node_modules" / ".bin" / "codex"
    if codex.exists():
        return codex
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: the real Codex CLI (npm @openai/codex) cannot be installed here")
    probe = subprocess.run([npm, "view", f"@openai/codex@{CODEX_VERSION}", "version"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"the npm registry is unavailable (npm view @openai/codex: {probe.stderr.strip()[-300:]})")
    prefix.mkdir(parents=True, exist_ok=True)
    install = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                              f"@openai/codex@{CODEX_VERSION}"], capture_output=True, text=True,
                             timeout=INSTALL_TIMEOUT_S)
    assert install.returncode == 0 and codex.exists(), f"npm install @openai/codex failed:\n{install.stderr[-2000:]}"
    return codex


def run_codex_exec(codex: Path, base_url: str, workdir: Path, prompt: str, model: str = "tiny",
                   instructions: str | None = None, timeout_s: float = 480) -> subprocess.CompletedProcess[str]:
    """One `codex exec` turn against the gateway at `base_url` (no /v1); its CODEX_HOME is workdir/codex-home.
    `instructions`: the model's base instructions in place of Codex's own (config key `model_instructions_file`),
    e.g. to keep the prompt short on a CPU cluster; None keeps Codex's."""
    home = workdir / "codex-home"
    home.mkdir(parents=True, exist_ok=True)
    instructions_line = ""
    if instructions is not None:
        (home / "instructions.md").write_text(instructions)
        instructions_line = f'model_instructions_file = "{home / "instructions.md"}"\n'
    (home / "config.toml").write_text(
        f'model = "{model}"\n'
        + instructions_line +
        'model_provider = "nextserve"\n'
        "[model_providers.nextserve]\n"
        'name = "nextserve"\n'
        f'base_url = "{base_url}/v1"\n'
        f'env_key = "{API_KEY_ENV}"\n'
        'wire_api = "responses"\n'
        "request_max_retries = 0\n"
        "stream_max_retries = 0\n")
    env = {**os.environ, "CODEX_HOME": str(home), API_KEY_ENV: "unused"}
    return subprocess.run([str(codex), "exec", "--skip-git-repo-check", "--sandbox", "read-only", prompt],
                          cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout_s)
