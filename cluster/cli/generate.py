"""`nextserve generate`: greedy or sampled generation in one process (the engine, the head model and the
experts in-process). Imported by the CLI only when `generate` runs (it loads torch models and transformers'
tokenizer)."""

from __future__ import annotations

import argparse
import json

from transformers import AutoTokenizer

from nextserve.cluster.cli.model_paths import resolve_model
from nextserve.cluster.cli.usage import UsageError
from nextserve.cluster.engine.contract import EngineRequestError
from nextserve.cluster.engine.engine import Engine
from nextserve.model.config import ConfigError, Qwen3NextConfig
from nextserve.model.loader import load_head
from nextserve.model.sampling import SamplingParams
from nextserve.router.local_backend import load_local_backend


def cmd_generate(args: argparse.Namespace) -> int:
    empty = [i for i, prompt in enumerate(args.prompts, 1) if not prompt]
    if empty:
        raise UsageError(f"PROMPT {empty[0]} is empty; pass the text to continue, e.g. "
                         f"nextserve generate --model {args.model} 'def fibonacci(n):'")
    path = resolve_model(args.model)
    Qwen3NextConfig.from_json(path)  # another model's checkpoint fails here, naming model_type, not in its tokenizer
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = Engine(load_head(path, args.dtype, mtp=False), load_local_backend(path, args.dtype), tokenizer)  # no drafts
    try:
        outputs = engine.generate_sync([tokenizer(p)["input_ids"] for p in args.prompts], params)
    except EngineRequestError as e:
        raise ConfigError(f"a prompt cannot be served: {e}") from None
    finally:
        engine.shutdown()
    for prompt, out in zip(args.prompts, outputs):
        ids = list(out.token_ids)
        print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": ids}) if args.json else prompt + out.text)
    return 0
