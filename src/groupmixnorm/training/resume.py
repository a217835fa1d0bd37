"""Training state saved after every epoch, so that an interrupted or diverged run loses at most one epoch.

The state holds everything the loop carries from one epoch to the next: the model, the optimizer, a
method's own modules (an adversary, say), the epoch history, the weights of the best epoch so far, and
every random generator (Python, numpy, torch's global one, and the loop's batch-order generator). A run
resumed from it therefore continues exactly as the uninterrupted run would have: same batches, same
mixing draws, same numbers. It is written atomically after each epoch and refused if it was written for
a different run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from groupmixnorm.files import atomic_output

STATE_FORMAT = "groupmixnorm-training-state"
STATE_VERSION = 1


class ResumeError(ValueError):
    """A training state that cannot be resumed: unreadable, not ours, or written for another run."""


@dataclass
class ResumePoint:
    """Where the loop keeps its state (``path``) and which run it belongs to (``run``, any JSON-like
    description, compared on load); ``resume`` says whether to continue from an existing state."""

    path: Path
    run: dict[str, Any] = field(default_factory=dict)
    resume: bool = False


@dataclass
class LoopState:
    """What the loop needs to continue after ``epoch`` (the last finished epoch)."""

    epoch: int
    history: list[dict[str, float]]
    epoch_seconds: list[float]
    best: tuple[int, dict[str, Any]] | None


def save_state(point: ResumePoint, state: LoopState, *, model: nn.Module, optimizer: torch.optim.Optimizer,
               method: Any, generator: torch.Generator) -> None:
    """Write the state after ``state.epoch`` to ``point.path`` (atomically)."""
    payload = {
        "format": STATE_FORMAT, "version": STATE_VERSION, "run": point.run,
        "epoch": state.epoch, "history": state.history, "epoch_seconds": state.epoch_seconds, "best": state.best,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "batches": generator.get_state()},
    }
    with atomic_output(point.path) as temporary:
        torch.save(payload, temporary)


def load_state(point: ResumePoint, *, model: nn.Module, optimizer: torch.optim.Optimizer, method: Any,
               generator: torch.Generator) -> LoopState | None:
    """Restore the saved state into the given objects; ``None`` if resuming is off or nothing was saved."""
    if not point.resume or not point.path.exists():
        return None
    try:
        payload = torch.load(point.path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ResumeError(f"cannot read the training state {point.path}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise ResumeError(f"{point.path} is not a groupmixnorm training state")
    if payload.get("version") != STATE_VERSION:
        raise ResumeError(f"{point.path} has state version {payload.get('version')}, this version reads {STATE_VERSION}")
    if payload["run"] != point.run:
        raise ResumeError(f"{point.path} was written by a different run (other options or data); "
                          "resume with the same command, or remove the file to start over")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    method.load_state_dict(payload["method"])
    rng = payload["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["batches"])
    return LoopState(payload["epoch"], payload["history"], payload["epoch_seconds"], payload["best"])
