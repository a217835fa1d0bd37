"""Adversarial debiasing (Zhang, Lemoine & Mitchell, AIES 2018)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from groupmixnorm.methods.base import FAIRNESS_CHOICES, Batch, Method, ModelSpec, binary_cross_entropy, option
from groupmixnorm.methods.models import build_network


@dataclass
class AdversarialDebiasing(Method):
    """The predictor minimises cross-entropy minus ``lam`` times the loss of an adversary that predicts
    the protected attribute from the predictor's logit (``"dp"``), or from the logit and the true label
    (``"eo"``: inputs ``s, s*y, s*(1-y)`` as in the paper). The adversary, a small MLP, is trained in
    alternation with its own Adam optimizer. This is the common "minus lambda" form; the paper's extra
    projection term is left out.
    """

    name = "adversarial"
    lam: float = option(1.0, "weight of the adversary's loss subtracted from the predictor's")
    fairness: str = option("dp", "what the adversary sees: dp (the logit) or eo (the logit and the label)",
                           choices=FAIRNESS_CHOICES)
    adversary_lr: float = option(1e-3, "Adam learning rate of the adversary")

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return build_network(spec)

    def setup(self, model: nn.Module, seed: int, spec: ModelSpec) -> None:
        inputs = 1 if self.fairness == "dp" else 3
        self.adversary = nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, spec.num_groups))
        self.adversary.to(next(model.parameters()).device)
        self.adversary_optimizer = torch.optim.Adam(self.adversary.parameters(), lr=self.adversary_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"adversary": self.adversary.state_dict(), "optimizer": self.adversary_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adversary.load_state_dict(state["adversary"])
        self.adversary_optimizer.load_state_dict(state["optimizer"])

    def _adversary_inputs(self, logits: Tensor, y: Tensor) -> Tensor:
        s = logits.unsqueeze(1)
        if self.fairness == "dp":
            return s
        label = y.unsqueeze(1)
        return torch.cat([s, s * label, s * (1 - label)], dim=1)

    def _adversary_loss(self, logits: Tensor, batch: Batch) -> Tensor:
        return nn.functional.cross_entropy(self.adversary(self._adversary_inputs(logits, batch.y)), batch.a)

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch.x).squeeze(-1)
        bce = binary_cross_entropy(logits, batch.y)
        adversary_loss = self._adversary_loss(logits, batch)
        return bce - self.lam * adversary_loss, {"bce": bce.item(), "adversary": adversary_loss.item()}

    def after_step(self, model: nn.Module, batch: Batch) -> None:
        with torch.no_grad():
            logits = model(batch.x).squeeze(-1)
        loss = self._adversary_loss(logits, batch)
        self.adversary_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.adversary_optimizer.step()
