"""The README's layer example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_layer_example_trains_a_step_and_predicts_without_the_attribute():
    text = README.read_text(encoding="utf-8")
    example = re.search(r"## The layer in your own model\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    model, scores = namespace["model"], namespace["scores"]
    assert not model.training
    assert scores.shape == (256, 1) and bool(((scores >= 0) & (scores <= 1)).all())
    assert all(p.grad is not None for p in model.parameters())
