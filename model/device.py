"""Which device a process computes on, and a head's routed-expert result on its accelerator.

The wire between heads and expert workers carries CPU bytes. A head on CUDA therefore hands its
backend CPU tensors and gets a CPU result back, which `DeviceResult` moves to the head's device
(router/epoch_follower.py hands it out). Letters: T = tokens, H = hidden.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
from torch import Tensor

from nextserve.model.config import ConfigError

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


class DeviceResult:
    """The inner future's result, copied to the head's device by whoever asks for it (the head's step
    thread), not by the dispatcher's event loop, which serves every other layer in flight."""

    def __init__(self, inner: "Future[Tensor]", device: torch.device) -> None:
        self.inner, self.device = inner, device

    def result(self, timeout: float | None = None) -> Tensor:  # [T, H]
        return self.inner.result(timeout).to(self.device)
