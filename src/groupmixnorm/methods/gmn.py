"""Training with GroupMixNorm layers in the model."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from groupmixnorm.methods.base import FAIRNESS_CHOICES, Batch, Method, ModelSpec, Sampling, binary_cross_entropy, option
from groupmixnorm.methods.models import build_network
from groupmixnorm.nn import collect_alignment, mix_within, use_groups


@dataclass
class GroupMixNormMethod(Method):
    """An MLP (or, for images, a CNN) with GroupMixNorm layers; cross-entropy plus ``align`` times the
    layers' alignment penalty.

    The default, chosen on the Adult bench (see the README), puts one layer on the logit and aligns the
    groups' logit distributions (16 quantiles) with weight 1. ``placement="all", align=0`` is the paper's
    layer after every hidden layer with no penalty. The protected attribute reaches the layers through
    :func:`groupmixnorm.nn.use_groups` during training; at prediction it is passed only when
    ``eval_mode="group"``.
    """

    name = "gmn"
    supports_distributed: ClassVar[bool] = True
    mix: str = option("shared", "how group statistics are mixed", choices=("shared", "pairwise"))
    alpha: float = option(1.0, "concentration of the Dirichlet/Beta mixing weights")
    p: float = option(1.0, "probability that a training batch is mixed (else treated as one group)")
    mix_within: str = option("none", "mix the groups' statistics over the whole batch (none) or only within each "
                             "label (label: groups alike within each label, for equalized odds)",
                             choices=("none", "label"))
    placement: str = option(
        "logit", "where the layers go: logit (one layer on the output itself), all hidden blocks, the first or last "
        "block, head (the output layer's input), or a comma-separated list of block indices (from 0), head and "
        "logit, like 0,logit"
    )
    eval_mode: str = option("population", "statistics at prediction time (instance: each image's own; images only)",
                            choices=("population", "group", "posterior", "instance"))
    output_scale: str = option("batch", "units of the layer's output", choices=("batch", "mixed"))
    momentum: float = option(0.1, "momentum of the running statistics")
    align: float = option(1.0, "weight of the alignment penalty (the fairness knob): group statistics at each layer's input")
    align_covariance: bool = option(False, "alignment also compares channel covariances")
    align_quantiles: int = option(16, "if > 0, alignment compares this many quantiles per channel (whole distributions)")
    align_projections: int = option(0, "if > 0, alignment compares quantiles along this many random directions of "
                                    "the channels (a sliced distance) instead of per channel")
    fairness: str = option("dp", "what alignment targets: dp (groups alike) or eo (groups alike within each label)",
                           choices=FAIRNESS_CHOICES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.align < 0 or self.align_quantiles < 0 or self.align_projections < 0:
            raise ValueError(f"align, align_quantiles and align_projections must be >= 0, got {self.align}, "
                             f"{self.align_quantiles} and {self.align_projections}")

    def batch_sampling(self) -> Sampling:
        """Shuffled batches, or per group and label when aligning for equalized odds or mixing within labels."""
        by_label = (self.fairness == "eo" and self.align > 0) or self.mix_within == "label"
        return "group_label" if by_label else "random"

    def build_model(self, spec: ModelSpec) -> nn.Module:
        if self.eval_mode == "instance" and spec.input_shape is None:
            raise ValueError("eval_mode='instance' normalizes each image with its own statistics; this data set has "
                             "feature vectors, not images")
        layer_options = {
            "mix": self.mix, "alpha": self.alpha, "p": self.p, "eval_mode": self.eval_mode,
            "output_scale": self.output_scale, "momentum": self.momentum,
            "align_covariance": self.align_covariance, "align_quantiles": self.align_quantiles,
            "align_projections": self.align_projections,
        }
        return build_network(spec, norm="groupmixnorm", placement=self.placement, norm_options=layer_options)

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        condition = batch.y.long() if self.fairness == "eo" else None
        collecting = collect_alignment(condition) if self.align > 0 else nullcontext([])
        strata = batch.y.long() if self.mix_within == "label" else None
        with use_groups(batch.a), mix_within(strata), collecting as penalties:
            logits = model(batch.x).squeeze(-1)
        bce = binary_cross_entropy(logits, batch.y)
        if not penalties:
            return bce, {"bce": bce.item()}
        alignment = torch.stack(penalties).sum()
        return bce + self.align * alignment, {"bce": bce.item(), "alignment": alignment.item()}

    def predict_logits(self, model: nn.Module, x: Tensor, a: Tensor | None = None) -> Tensor:
        with use_groups(a if self.uses_sensitive_at_prediction() else None):
            return model(x).squeeze(-1)

    def uses_sensitive_at_prediction(self) -> bool:
        return self.eval_mode == "group"
