"""Training methods as strategies for the one training loop, and the model builders they share."""

from __future__ import annotations

from typing import Any

from groupmixnorm.methods.adversarial import AdversarialDebiasing
from groupmixnorm.methods.base import Batch, Method, ModelSpec, method_fields
from groupmixnorm.methods.dependence import HSICPenalty, PrejudiceRemover
from groupmixnorm.methods.erm import ERM
from groupmixnorm.methods.expgrad import ExponentiatedGradientMethod
from groupmixnorm.methods.fairmixup import FairMixup
from groupmixnorm.methods.fairret_peer import FairretPenalty
from groupmixnorm.methods.gapreg import GapRegularization
from groupmixnorm.methods.gmn import GroupMixNormMethod
from groupmixnorm.methods.models import build_cnn, build_mlp, build_network
from groupmixnorm.methods.scorematch import ScoreMatching
from groupmixnorm.methods.thresholdopt import ThresholdOptimization

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        ERM, GroupMixNormMethod, GapRegularization, AdversarialDebiasing, FairMixup, ExponentiatedGradientMethod,
        HSICPenalty, PrejudiceRemover, ScoreMatching, FairretPenalty, ThresholdOptimization,
    )
}


def make_method(name: str, **options: Any) -> Method:
    """Instantiate the method called ``name`` with its options; unknown names or options raise ValueError."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    known = {f.name for f in method_fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {sorted(unknown)}; its options: {sorted(known)}")
    return cls(**options)


__all__ = [
    "METHODS", "AdversarialDebiasing", "Batch", "ERM", "ExponentiatedGradientMethod", "FairMixup", "FairretPenalty", "GapRegularization",
    "GroupMixNormMethod", "HSICPenalty", "Method", "ModelSpec", "PrejudiceRemover", "ScoreMatching", "build_cnn",
    "build_mlp", "build_network", "make_method",
]
