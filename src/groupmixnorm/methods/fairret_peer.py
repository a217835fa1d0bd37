"""The ``fairret`` package (Buyl et al., "fairret: a Framework for Differentiable Fairness Regularization
Terms", ICLR 2024) as a peer: its norm fairret added to the cross-entropy, used as installed."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from groupmixnorm.methods.dependence import ScorePenalty


@dataclass
class FairretPenalty(ScorePenalty):
    """Cross-entropy plus ``lam`` times fairret's ``NormLoss``: the 1-norm, over groups, of each group's
    relative deviation from the overall positive rate. For ``"eo"`` it is taken within each label (the
    true and false positive rates), as :class:`~groupmixnorm.methods.dependence.ScorePenalty` does."""

    name = "fairret"

    def penalty(self, logits: Tensor, groups: Tensor) -> Tensor:
        present, ids = torch.unique(groups, return_inverse=True)
        if len(present) < 2:  # no gap to measure among the rows of one group
            return logits.new_zeros(())
        sensitive = nn.functional.one_hot(ids, len(present)).to(logits.dtype)  # the groups in these rows
        return _positive_rate_fairret()(logits.unsqueeze(-1), sensitive)


@functools.cache
def _positive_rate_fairret() -> Any:
    """fairret's ``NormLoss`` of the positive rate (imported here: the package serves this method only)."""
    from fairret.loss import NormLoss
    from fairret.statistic import PositiveRate

    return NormLoss(PositiveRate())
