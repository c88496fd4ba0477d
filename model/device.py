"""Which device a process computes on, and the expert-backend adapter for a head on an accelerator.

The wire between heads and expert workers carries CPU bytes. A head on CUDA therefore hands its
backend CPU tensors and gets a CPU result back, which `DeviceExpertBackend` moves to the head's
device. Letters: T = tokens, H = hidden, k = experts per token.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
from torch import Tensor

from nextserve.model.config import ConfigError
from nextserve.model.expert_backend import ExpertBackend

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cuda' without one is an error."""
    if requested not in DEVICE_CHOICES:
        raise ConfigError(f"device {requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for, but torch sees no CUDA GPU "
                          f"(torch {torch.__version__}); use 'cpu' or 'auto'")
    return torch.device(requested)


class DeviceExpertBackend:
    """Wraps a backend that takes and returns CPU tensors (the remote one) for a head on `device`."""

    def __init__(self, inner: ExpertBackend, device: torch.device) -> None:
        self.inner = inner
        self.device = device

    def submit(self, layer: int, hidden: Tensor, ids: Tensor, weights: Tensor) -> "DeviceResult":
        """hidden [T, H], ids / weights [T, k] on the head's device -> a result of [T, H] on it."""
        return DeviceResult(self.inner.submit(layer, hidden.cpu(), ids.cpu(), weights.cpu()), self.device)


class DeviceResult:
    """The inner future's result, copied to the head's device by whoever asks for it (the head's step
    thread), not by the dispatcher's event loop, which serves every other layer in flight."""

    def __init__(self, inner: "Future[Tensor]", device: torch.device) -> None:
        self.inner, self.device = inner, device

    def result(self, timeout: float | None = None) -> Tensor:  # [T, H]
        return self.inner.result(timeout).to(self.device)
