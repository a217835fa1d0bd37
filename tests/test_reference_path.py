"""The plain-autograd reference inside the modules: the same numbers as the fused path, double backward,
and torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch

from groupmixnorm.nn import GroupMixNorm1d, GroupMixNorm2d, collect_alignment, use_groups, use_reference

CASES = {
    "shared": ((24, 5), GroupMixNorm1d, {}),
    "pairwise": ((24, 5), GroupMixNorm1d, {"mix": "pairwise"}),
    "sometimes-mixed": ((24, 5), GroupMixNorm1d, {"p": 0.5, "output_scale": "mixed"}),
    "images": ((12, 3, 4, 4), GroupMixNorm2d, {"align_quantiles": 4}),
}


def _step(layer: torch.nn.Module, x: torch.Tensor, groups: torch.Tensor, reference: bool, seed: int):
    torch.manual_seed(seed)  # the same mixing draws on both paths
    x = x.clone().requires_grad_()
    with use_groups(groups), collect_alignment() as penalties:
        if reference:
            with use_reference():
                out = layer(x)
        else:
            out = layer(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    loss = (out * weights).sum() + sum(penalties)
    loss.backward()
    return out.detach(), x.grad, [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("case", list(CASES))
def test_the_reference_path_gives_the_fused_path_s_outputs_gradients_and_running_statistics(case: str) -> None:
    shape, kind, options = CASES[case]
    generator = torch.Generator().manual_seed(3)
    groups = torch.tensor([0, 1, 2, 1] * (shape[0] // 4))
    fused = kind(shape[1], num_groups=3, dtype=torch.float64, **options)
    reference = copy.deepcopy(fused)
    for call in range(3):
        x = torch.randn(shape, dtype=torch.float64, generator=generator) * (1 + groups.view(-1, *[1] * (len(shape) - 1)))
        got, expected = _step(reference, x, groups, True, call), _step(fused, x, groups, False, call)
        for a, b in zip(got[:2] + tuple(got[2]), expected[:2] + tuple(expected[2])):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for name, buffer in fused.state_dict().items():
        torch.testing.assert_close(reference.state_dict()[name], buffer, atol=1e-12, rtol=1e-12, msg=name)


def test_double_backward_through_a_model_works_inside_use_reference() -> None:
    """A gradient penalty (the gradient of the output with respect to the input, differentiated again)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), GroupMixNorm1d(6, num_groups=2),
                                torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    groups = torch.tensor([0, 1] * 5)

    def input_gradient_norm(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)
        with use_groups(groups), use_reference():
            (gradient,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        return gradient.square().sum()

    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(input_gradient_norm, (x,))
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):  # the fused path cannot
        with use_groups(groups):
            (gradient,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        gradient.square().sum().backward()


def _model_and_copy(num_groups: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A small network with the layer after its first linear map, and an eager copy of it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False),
                                GroupMixNorm1d(16, num_groups=num_groups, align_quantiles=4),
                                torch.nn.ReLU(), torch.nn.Linear(16, 1))
    return model, copy.deepcopy(model)


def _training_step(network: torch.nn.Module, x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One forward and backward with the alignment penalty, from the same seed; the output and how many
    penalties were collected."""
    torch.manual_seed(1)
    with use_groups(groups), collect_alignment() as penalties:
        out = network(x)
    (out.square().mean() + sum(penalties)).backward()
    return out.detach(), len(penalties)


def test_a_compiled_model_trains_and_evaluates_as_the_eager_one() -> None:
    """torch.compile traces the layer (its reference path) instead of failing on the fused functions. The
    ``aot_eager`` backend traces forward and backward as inductor would, without compiling C++ kernels."""
    model, eager = _model_and_copy(num_groups=2)
    compiled = torch.compile(model, backend="aot_eager")
    x, groups = torch.randn(64, 8), torch.randint(0, 2, (64,))
    outputs = [_training_step(network, x, groups)[0] for network in (compiled, eager)]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-6)
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    compiled.eval(), eager.eval()
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ids", [[0, 1], [0, 1, 2]], ids=["two groups", "a group of one sample"])
def test_a_compiled_training_step_is_one_graph_with_the_eager_numbers(ids: list[int]) -> None:
    """``fullgraph=True`` fails on any graph break: the layer's checks, group-table fallback, mixing draw,
    running statistics and the blocks' values (use_groups, collect_alignment) trace without reading a
    number back. A group of one sample takes the batch fallback, inside the graph too."""
    model, eager = _model_and_copy(num_groups=3)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(65, 8)
    groups = torch.cat([torch.randint(0, 2, (64,)), torch.tensor([ids[-1]])])
    results = [_training_step(network, x, groups) for network in (compiled, eager)]
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    assert results[0][1] == results[1][1] == 1
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_evaluation_without_running_statistics_follows_the_reference_path_too() -> None:
    """Without running statistics evaluation normalizes with the batch; inside use_reference it does so in
    plain autograd (the same numbers), so its input gradient is differentiable again."""
    layer = GroupMixNorm1d(5, num_groups=3, track_running_stats=False, dtype=torch.float64).eval()
    generator = torch.Generator().manual_seed(5)
    groups = torch.tensor([0, 1, 2, 1] * 6)
    x = (torch.randn(24, 5, dtype=torch.float64, generator=generator) * (1 + groups.view(-1, 1))).requires_grad_()
    weights = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).reshape(x.shape)
    fused = layer(x, groups)
    with use_reference():
        reference = layer(x, groups)
    torch.testing.assert_close(reference, fused, atol=1e-10, rtol=1e-10)
    (gradient,) = torch.autograd.grad((reference * weights).sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad((fused * weights).sum(), x)
    torch.testing.assert_close(gradient, expected, atol=1e-10, rtol=1e-10)
    gradient.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
