"""Gap regularization: cross-entropy plus a weighted, differentiable fairness gap on the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from groupmixnorm.methods.base import Batch, Method, ModelSpec, Sampling, binary_cross_entropy, option
from groupmixnorm.methods.models import build_network

FAIRNESS_CHOICES = ("dp", "eo")


def group_mean_gap(scores: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Largest difference between the groups' mean scores in the batch (groups present only)."""
    counts = torch.zeros(num_groups, device=scores.device).index_add(0, groups, torch.ones_like(scores))
    sums = torch.zeros(num_groups, device=scores.device).index_add(0, groups, scores)
    present = counts > 0
    means = sums[present] / counts[present]
    if means.numel() < 2:
        return scores.new_zeros(())
    return means.max() - means.min()


def batch_gap(scores: Tensor, batch: Batch, fairness: str, num_groups: int) -> Tensor:
    """The soft demographic-parity gap, or for ``"eo"`` the sum over labels of the per-label gaps."""
    if fairness == "dp":
        return group_mean_gap(scores, batch.a, num_groups)
    gaps = [group_mean_gap(scores[batch.y == label], batch.a[batch.y == label], num_groups) for label in (0, 1)]
    return gaps[0] + gaps[1]


@dataclass
class GapRegularization(Method):
    """Cross-entropy plus ``lam`` times the batch's soft DP gap (or equalized-odds gap), as in the
    "GapReg" baseline of Fair Mixup (Chuang & Mroueh, ICLR 2021); batches are balanced per group
    (per group and label for ``"eo"``) so every batch estimates the gap."""

    name = "gapreg"
    lam: float = option(0.5, "weight of the fairness gap in the loss")
    fairness: str = option("dp", "gap to regularize: dp (demographic parity) or eo (equalized odds)",
                           choices=FAIRNESS_CHOICES)

    def __post_init__(self) -> None:
        if self.fairness not in FAIRNESS_CHOICES:
            raise ValueError(f"fairness must be one of {FAIRNESS_CHOICES}, got {self.fairness!r}")
        self.num_groups = 2

    @property
    def sampling(self) -> Sampling:  # type: ignore[override]
        return "group" if self.fairness == "dp" else "group_label"

    def build_model(self, spec: ModelSpec) -> nn.Module:
        self.num_groups = spec.num_groups
        return build_network(spec)

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch.x).squeeze(-1)
        bce = binary_cross_entropy(logits, batch.y)
        gap = batch_gap(torch.sigmoid(logits), batch, self.fairness, self.num_groups)
        return bce + self.lam * gap, {"bce": bce.item(), "gap": gap.item()}
