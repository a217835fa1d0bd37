"""Penalties on the statistical dependence between the model's scores and the protected attribute.

Two in-processing baselines of the FFB benchmark (Han et al., "FFB: A Fair Fairness Benchmark for
In-Processing Group Fairness Methods", ICLR 2024), written from their published definitions:

- HSIC (Gretton et al., 2005): the Hilbert-Schmidt independence criterion between the scores and the group,
  zero when they are independent (demographic parity in distribution, not only in the mean).
- Prejudice remover (Kamishima et al., 2012): the batch estimate of the mutual information between the
  predicted label and the group.

For equalized odds (``fairness="eo"``) each penalty is computed within each label and the two are added,
and batches are drawn per group and label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from groupmixnorm.methods.base import FAIRNESS_CHOICES, Batch, Method, ModelSpec, Sampling, binary_cross_entropy, option
from groupmixnorm.methods.models import build_network


def hsic(scores: Tensor, groups: Tensor) -> Tensor:
    """Biased HSIC estimate ``tr(K H L H) / (n - 1)^2`` between scores and group ids.

    ``K`` is a Gaussian kernel ``exp(-d^2 / (2 m))`` on the scores, where ``m`` is the median (the lower
    middle value) of the batch's nonzero squared score differences, held fixed for the gradient, ``L`` the delta kernel on groups (1 for the same group), ``H``
    the centring matrix. Zero for a batch of fewer than two samples.
    """
    n = scores.shape[0]
    if n < 2:
        return scores.new_zeros(())
    distances = (scores.unsqueeze(0) - scores.unsqueeze(1)).pow(2)
    with torch.no_grad():
        bandwidth = distances[distances > 0].median() if bool((distances > 0).any()) else distances.new_ones(())
    kernel = torch.exp(-distances / (2 * bandwidth))
    same_group = (groups.unsqueeze(0) == groups.unsqueeze(1)).to(scores.dtype)
    centred_kernel = kernel - kernel.mean(dim=0, keepdim=True) - kernel.mean(dim=1, keepdim=True) + kernel.mean()
    return (centred_kernel * same_group).sum() / (n - 1) ** 2


def prejudice_index(scores: Tensor, groups: Tensor) -> Tensor:
    """Mutual information between the predicted label and the group, estimated on the batch.

    ``mean_i sum_y P(y | x_i) log(P(y | a_i) / P(y))`` with ``P(y=1 | x_i)`` the score, ``P(y | a)`` the
    mean score of group ``a`` and ``P(y)`` that of the batch.
    """
    groups = torch.unique(groups, return_inverse=True)[1]
    counts = torch.bincount(groups).to(scores.dtype)
    group_rate = torch.zeros_like(counts).index_add(0, groups, scores) / counts
    tiny = torch.finfo(scores.dtype).tiny
    positive = (group_rate[groups] / scores.mean()).clamp_min(tiny).log()
    negative = ((1 - group_rate[groups]) / (1 - scores.mean())).clamp_min(tiny).log()
    return (scores * positive + (1 - scores) * negative).mean()


@dataclass
class ScorePenalty(Method):
    """Cross-entropy plus ``lam`` times a penalty on the batch's logits and groups, which subclasses define
    in :meth:`penalty`. For ``fairness="eo"`` the penalty is taken within each label and the two are added;
    batches are balanced per group (per group and label for ``"eo"``), so every batch measures it."""

    lam: float = option(1.0, "weight of the fairness penalty in the loss")
    fairness: str = option("dp", "dp (scores independent of the group) or eo (independent within each label)",
                           choices=FAIRNESS_CHOICES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")

    def batch_sampling(self) -> Sampling:
        """Balanced per group (per group and label for ``"eo"``), so that every batch measures the penalty."""
        return "group" if self.fairness == "dp" else "group_label"

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return build_network(spec)

    def penalty(self, logits: Tensor, groups: Tensor) -> Tensor:
        """The penalty of one batch (or, for ``"eo"``, of its rows with one label): logits ``(n,)``."""
        raise NotImplementedError

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch.x).squeeze(-1)
        bce = binary_cross_entropy(logits, batch.y)
        if self.fairness == "dp":
            penalty = self.penalty(logits, batch.a)
        else:
            penalty = sum(self.penalty(logits[batch.y == label], batch.a[batch.y == label]) for label in (0, 1))
        return bce + self.lam * penalty, {"bce": bce.item(), self.name: float(penalty.detach())}


@dataclass
class HSICPenalty(ScorePenalty):
    """HSIC between scores and the protected group (FFB's ``HSIC`` baseline)."""

    name = "hsic"

    def penalty(self, logits: Tensor, groups: Tensor) -> Tensor:
        return hsic(torch.sigmoid(logits), groups)


@dataclass
class PrejudiceRemover(ScorePenalty):
    """The prejudice remover regularizer (FFB's ``PRemover`` baseline)."""

    name = "prem"

    def penalty(self, logits: Tensor, groups: Tensor) -> Tensor:
        return prejudice_index(torch.sigmoid(logits), groups) if logits.numel() else logits.new_zeros(())
