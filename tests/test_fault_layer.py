"""Fuzzing the layer: for every finite input the output and its gradient are finite, or a clear error is
raised; non-finite input is refused in training before it reaches the running statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupmixnorm.nn import GroupMixNorm1d, GroupMixNorm2d, collect_alignment

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: float16 holds magnitudes up to about 6.5e4, so larger inputs would not be finite to begin with.
SAFE_SCALE = {torch.float32: 1e8, torch.float64: 1e8, torch.bfloat16: 1e8, torch.float16: 1e3}


@st.composite
def batches(draw: st.DrawFn) -> dict:
    """A layer configuration and a batch: shape, dtype, group layout, scale, offset, constant channels."""
    image = draw(st.booleans())
    n = draw(st.integers(1, 40))
    channels = draw(st.integers(1, 5))
    spatial = (draw(st.integers(1, 4)), draw(st.integers(1, 4))) if image else draw(st.sampled_from([(), (3,)]))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["one", "absent", "singletons", "many", "random"]))
    num_groups = {"one": 1, "absent": 6, "singletons": n, "many": 64, "random": 3}[layout]
    if layout == "one":
        groups = [0] * n
    elif layout == "absent":
        groups = [draw(st.sampled_from([1, 4])) for _ in range(n)]
    elif layout == "singletons":
        groups = list(range(n))
    else:
        groups = [draw(st.integers(0, num_groups - 1)) for _ in range(n)]
    scale = draw(st.sampled_from([1e-8, 1e-3, 1.0, 1e3, 1e8]))
    scale = min(scale, SAFE_SCALE[dtype])
    offset = draw(st.sampled_from([0.0, 1.0, -50.0])) * scale
    constant = draw(st.lists(st.booleans(), min_size=channels, max_size=channels))
    options = {"mix": draw(st.sampled_from(["shared", "pairwise"])), "p": draw(st.sampled_from([1.0, 0.5, 0.0])),
               "output_scale": draw(st.sampled_from(["batch", "mixed"])), "align_quantiles": draw(st.sampled_from([0, 4]))}
    return dict(image=image, shape=(n, channels, *spatial), dtype=dtype, groups=groups, num_groups=num_groups,
                scale=scale, offset=offset, constant=constant, options=options, seed=draw(st.integers(0, 2**16)))


def _input(case: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["shape"], generator=generator, dtype=torch.float64) * case["scale"] + case["offset"]
    for channel, constant in enumerate(case["constant"]):
        if constant:
            x[:, channel] = case["offset"] + case["scale"]
    return x.to(case["dtype"])


def _layer(case: dict) -> torch.nn.Module:
    kind = GroupMixNorm2d if case["image"] else GroupMixNorm1d
    return kind(case["shape"][1], num_groups=case["num_groups"], dtype=case["dtype"], **case["options"])


@FUZZ
@given(batches())
def test_finite_input_gives_finite_output_and_gradient_or_a_clear_error(case: dict) -> None:
    torch.manual_seed(case["seed"])
    layer = _layer(case)
    x = _input(case).requires_grad_(True)
    groups = torch.tensor(case["groups"])
    assert torch.isfinite(x).all()
    try:
        with collect_alignment() as penalties:
            out = layer(x, groups)
        loss = out.float().square().mean() + sum(p.float() for p in penalties)
        loss.backward()
    except ValueError as error:
        assert str(error) and type(layer).__name__ in str(error) or "value per channel" in str(error)
        return
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.isfinite(out).all(), "training output"
    assert torch.isfinite(x.grad).all(), "input gradient"
    for name, buffer in layer.named_buffers():
        if buffer.is_floating_point():
            assert torch.isfinite(buffer).all(), name
    layer.eval()
    with torch.no_grad():
        evaluated = layer(_input(case))
    assert torch.isfinite(evaluated).all(), "evaluation output"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mix", ["shared", "pairwise"])
def test_non_finite_input_is_refused_before_the_running_statistics_change(bad: float, mix: str) -> None:
    layer = GroupMixNorm1d(3, num_groups=2, mix=mix)
    x = torch.randn(16, 3)
    x[5, 1] = bad
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    with pytest.raises(ValueError, match=r"non-finite values in training: channel\(s\) \[1\]"):
        layer(x, torch.arange(16) % 2)
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_half_precision_is_computed_in_float32() -> None:
    """The sums of squares of these values overflow float16, and sums in bfloat16 would lose whole units;
    the layer computes its statistics in float32 and returns the input's dtype."""
    for dtype, scale in ((torch.float16, 150.0), (torch.bfloat16, 2e4)):
        layer = GroupMixNorm1d(2, num_groups=2, dtype=dtype)
        x = (torch.randn(512, 2) * scale).to(dtype).requires_grad_(True)
        groups = torch.arange(512) % 2
        out = layer(x, groups)
        out.float().square().sum().backward()
        assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        expected_mean = x.detach().float().mean(0) * 0.1
        torch.testing.assert_close(layer.running_mean.float(), expected_mean, rtol=2e-2, atol=scale * 1e-3)


def test_float16_buffers_that_cannot_hold_the_variance_are_a_clear_error() -> None:
    layer = GroupMixNorm1d(1, num_groups=1, dtype=torch.float16)
    x = (torch.randn(8, 1) * 1e3).to(torch.float16)  # variance about 1e6, beyond float16's 65504
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    with pytest.raises(ValueError, match="keeps its running statistics in torch.float16"):
        layer(x, torch.zeros(8, dtype=torch.long))
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, before[name]), name
