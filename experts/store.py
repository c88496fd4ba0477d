"""The expert weights a worker holds, stacked per layer, and their load counters.

Tables are copy-on-write: LoadExperts/DropExperts build a new `layer -> LayerTable` dict and swap it
in under a writer lock, so a Dispatch that took a snapshot keeps computing on consistent weights and
readers never lock. The stacked weights live on the worker's device (CUDA when it was given a GPU);
the routing map stays on the CPU, where requests are decoded. Letters: n = experts held in a layer,
E = routed experts per layer (global), I = moe intermediate, H = hidden, P = (token, expert) pairs.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nextserve.model.checkpoint import parse_dtype
from nextserve.model.config import Qwen3NextConfig
from nextserve.model.layers.experts import ExpertWeights, cat_experts, weight_bytes
from nextserve.model.loader import load_experts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerTable:
    """One layer's held experts: global id -> row of the stacked weights."""
    expert_ids: tuple[int, ...]  # [n] global id of each row, ascending
    global_to_row: Tensor        # [E] int64 on the CPU, -1 where the expert is not held
    gate_up: ExpertWeights       # [n, 2I, H] on the worker's device (an FP8 checkpoint's: FP8 + block scales)
    down: ExpertWeights          # [n, H, I] on the worker's device


def _table(num_experts: int, expert_ids: list[int], gate_up: ExpertWeights, down: ExpertWeights) -> LayerTable:
    order = sorted(range(len(expert_ids)), key=lambda i: expert_ids[i])
    ids = [expert_ids[i] for i in order]
    global_to_row = torch.full((num_experts,), -1, dtype=torch.int64)
    global_to_row[torch.tensor(ids, dtype=torch.int64)] = torch.arange(len(ids))
    index = torch.tensor(order, dtype=torch.int64, device=gate_up.device)
    return LayerTable(tuple(ids), global_to_row, gate_up[index].contiguous(), down[index].contiguous())


class ExpertStore:
    def __init__(self, model_dir: str | Path, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.config = Qwen3NextConfig.from_json(self.model_dir)
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device)
        self.epoch = 0
        """Only moves forward: a load or drop stamped with an older epoch changes the weights, not this."""
        self.epochs_refused = 0
        """Loads / drops that asked to move `epoch` back (logged; a controller out of step with Redis)."""
        self._tables: dict[int, LayerTable] = {}
        self._write_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._served: dict[int, Tensor] = {}  # layer -> [E] int64 tokens served since the expert was loaded
        self.peak_pairs = 0
        """The most (layer, expert) pairs held at once since start: what a live move must keep within memory."""

    def snapshot(self) -> dict[int, LayerTable]:
        """The current tables; never mutated after publication, safe to use without a lock."""
        return self._tables

    def pairs(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer, table in sorted(self._tables.items()) for e in table.expert_ids]

    def load(self, pairs: Iterable[tuple[int, int]], epoch: int | None = None) -> None:
        """Read the (layer, expert) pairs not yet held from the checkpoint and publish new tables."""
        with self._write_lock:
            tables = dict(self._tables)
            missing = sorted((layer, e) for layer, e in set(pairs) if not self._holds(tables, layer, e))
            for layer, loaded in load_experts(self.model_dir, missing, self.dtype).items():
                old = tables.get(layer)
                ids = list(loaded.expert_ids)
                gate_up, down = loaded.gate_up.to(self.device), loaded.down.to(self.device)
                if old is not None:
                    ids = list(old.expert_ids) + ids
                    gate_up, down = cat_experts([old.gate_up, gate_up]), cat_experts([old.down, down])
                tables[layer] = _table(self.config.num_experts, ids, gate_up, down)
            with self._count_lock:
                for layer, e in missing:
                    self._served.setdefault(layer, torch.zeros(self.config.num_experts, dtype=torch.int64))[e] = 0
            self._publish(tables, epoch)

    def _holds(self, tables: dict[int, LayerTable], layer: int, expert: int) -> bool:
        table = tables.get(layer)
        return table is not None and 0 <= expert < self.config.num_experts and int(table.global_to_row[expert]) >= 0

    def drop(self, pairs: Iterable[tuple[int, int]], epoch: int | None = None) -> None:
        with self._write_lock:
            tables = dict(self._tables)
            by_layer: dict[int, set[int]] = defaultdict(set)
            for layer, e in pairs:
                by_layer[layer].add(e)
            for layer, gone in by_layer.items():
                old = tables.get(layer)
                if old is None:
                    continue
                keep = [i for i, e in enumerate(old.expert_ids) if e not in gone]
                if not keep:
                    del tables[layer]
                    continue
                index = torch.tensor(keep, dtype=torch.int64, device=self.device)
                tables[layer] = _table(self.config.num_experts, [old.expert_ids[i] for i in keep],
                                       old.gate_up[index], old.down[index])
            self._publish(tables, epoch)  # a dropped expert's count is zeroed if it is loaded again

    def _publish(self, tables: dict[int, LayerTable], epoch: int | None) -> None:
        self._tables = tables
        self.peak_pairs = max(self.peak_pairs, sum(len(t.expert_ids) for t in tables.values()))
        if epoch is not None and epoch < self.epoch:
            self.epochs_refused += 1
            log.warning("kept placement epoch %d: a change stamped with the older epoch %d does not move it back "
                        "(%d refused so far)", self.epoch, epoch, self.epochs_refused)
        elif epoch is not None:
            self.epoch = epoch

    def weight_bytes(self) -> int:
        """Bytes of the expert weights held now (an FP8 checkpoint's: FP8 weights + float32 block scales)."""
        return sum(weight_bytes(t.gate_up) + weight_bytes(t.down) for t in self._tables.values())

    def record(self, layer: int, experts: Tensor) -> None:
        """Count served tokens per expert; experts [P] int64 global ids of a Dispatch's pairs."""
        counts = torch.bincount(experts, minlength=self.config.num_experts)  # [E], one op per call
        with self._count_lock:
            self._served[layer] += counts

    def tokens_served(self) -> dict[tuple[int, int], int]:
        """(layer, expert) -> tokens, for the experts held now."""
        with self._count_lock:
            served = {layer: counts.tolist() for layer, counts in self._served.items()}
        return {(layer, e): served[layer][e] for layer, e in self.pairs()}
