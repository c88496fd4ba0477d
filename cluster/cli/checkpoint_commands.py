"""`nextserve make-tiny` and `nextserve quantize-fp8`: the commands that write a checkpoint. Imported by
the CLI only when one of them runs (they import transformers and the FP8 writer)."""

from __future__ import annotations

import argparse

from nextserve.cluster.cli.model_paths import resolve_model
from nextserve.model.checkpoint import parse_dtype
from nextserve.model.fp8_checkpoint import DEFAULT_NOT_CONVERTED, dequantized_twin, quantize_checkpoint
from nextserve.model.tiny import make_tiny


def cmd_make_tiny(args: argparse.Namespace) -> int:
    print(make_tiny(args.dir, args.pad_vocab))
    return 0


def cmd_quantize_fp8(args: argparse.Namespace) -> int:
    src = resolve_model(args.src)
    out = quantize_checkpoint(src, args.dst, args.block, tuple(args.not_convert or DEFAULT_NOT_CONVERTED))
    print(out)
    if args.twin is not None:
        print(dequantized_twin(out, args.twin, parse_dtype(args.twin_dtype)))
    return 0
