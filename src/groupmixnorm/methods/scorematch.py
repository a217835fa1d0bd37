"""Score matching: the groups' logit distributions pulled together by a quantile penalty, with no
GroupMixNorm layer.

This is the default ``gmn`` configuration (one layer on the logit plus its quantile alignment) with the
layer taken out, so that the layer's own contribution shows as an ablation in every benchmark. Matching
whole score distributions between groups is prior art: Wasserstein fair classification (Jiang et al.,
UAI 2019) penalizes the Wasserstein distance between the groups' score distributions, which the squared
quantile distance estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from groupmixnorm.methods.base import FAIRNESS_CHOICES, Batch, Method, ModelSpec, Sampling, binary_cross_entropy, option
from groupmixnorm.methods.models import build_network
from groupmixnorm.nn import functional as F

#: The alignment's variance floor, GroupMixNorm's ``eps``.
EPS = 1e-5


@dataclass
class ScoreMatching(Method):
    """Cross-entropy plus ``lam`` times the squared distance between each group's logit quantiles and the
    batch's (in units of the batch's logit deviation): :func:`groupmixnorm.nn.functional.alignment_penalty`
    applied to the model's output."""

    name = "scorematch"
    lam: float = option(1.0, "weight of the quantile-matching penalty in the loss")
    quantiles: int = option(16, "how many quantiles of each group's logits are matched")
    fairness: str = option("dp", "dp (groups alike) or eo (groups alike within each label)", choices=FAIRNESS_CHOICES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0 or self.quantiles < 1:
            raise ValueError(f"lam must be >= 0 and quantiles >= 1, got {self.lam} and {self.quantiles}")

    def batch_sampling(self) -> Sampling:
        """Shuffled batches, as the ``gmn`` default it ablates (per group and label for equalized odds)."""
        return "group_label" if self.fairness == "eo" else "random"

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return build_network(spec)

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch.x)  # (N, 1): one channel
        bce = binary_cross_entropy(logits.squeeze(-1), batch.y)
        options = {"eps": EPS, "quantiles": self.quantiles}
        table_size = int(batch.a.max()) + 1  # groups absent from the batch take no share
        if self.fairness == "dp":
            moments = F.group_moments(logits, batch.a, table_size)
            penalty = F.alignment_penalty(logits, batch.a, moments, **options)
        else:
            penalty = F.conditional_alignment_penalty(logits, batch.a, table_size, batch.y, **options)
        return bce + self.lam * penalty, {"bce": bce.item(), "alignment": penalty.item()}
