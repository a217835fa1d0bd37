"""The compiled CPU kernels (numba) of the shared-mixture training step: values, gradients, running
statistics and the rule that picks them, against the plain-autograd reference and the torch path."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

from groupmixnorm.nn import GroupMixNorm1d, GroupMixNorm2d
from groupmixnorm.nn import _fused_cpu as FC
from groupmixnorm.nn import functional as F
from groupmixnorm.nn.modules import NonFiniteStatistics

needs_numba = pytest.mark.skipif(not FC.AVAILABLE, reason="numba is not installed (or GROUPMIXNORM_NUMBA=0)")

# Group layouts: every group present with several samples; an absent group (1) and a singleton (3), whose
# rows fall back to the batch's statistics; one group only; many groups, several of them with one sample.
LAYOUTS = {
    "plain": lambda n: torch.arange(n) % 4,
    "degenerate": lambda n: torch.tensor([0, 2] * ((n - 1) // 2) + [0] * ((n - 1) % 2) + [3]),
    "one group": lambda n: torch.full((n,), 2),
    "many": lambda n: torch.arange(n) % 64,
}


def _tolerance(
    expected: torch.Tensor, dtype: torch.dtype, own_error: float = 0.0, ulps: float = 400
) -> dict[str, float]:
    """A few hundred units in the last place of ``dtype``, relative to the magnitude of ``expected``; or, for
    an ill-conditioned case (groups of two close samples), four times ``own_error``, how far the reference
    itself computed in ``dtype`` lands from ``expected``."""
    scale = max(float(expected.detach().abs().max()), 1.0)
    return {"atol": max(ulps * torch.finfo(dtype).eps * scale, 4 * own_error), "rtol": 0.0}


def _inputs(shape, dtype, layout, affine, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, channels = shape[0], shape[1]
    groups = LAYOUTS[layout](n)
    num_groups = 64 if layout == "many" else 4
    base = torch.randn(*shape, dtype=torch.float64, generator=gen)
    offsets = torch.randn(num_groups, channels, dtype=torch.float64, generator=gen) * 3
    spatial = [1] * (len(shape) - 2)
    x = base * (1 + groups.view(-1, 1, *spatial) % 3) + offsets[groups].view(n, channels, *spatial)
    counts = torch.bincount(groups, minlength=num_groups).to(torch.float64) * x[0, 0].numel()
    mixing = F.shared_mixing_weights(counts, 1.0, all_eligible=False)
    weight = torch.rand(channels, dtype=torch.float64, generator=gen) + 0.5 if affine else None
    bias = torch.randn(channels, dtype=torch.float64, generator=gen) if affine else None
    upstream = torch.randn(*shape, dtype=torch.float64, generator=gen)
    return x.to(dtype), groups, num_groups, mixing.to(dtype), weight, bias, upstream.to(dtype)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(130, 5), (96, 3, 4), (70, 2, 3, 3)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("output_scale", ["batch", "mixed"])
@pytest.mark.parametrize("affine", [True, False])
def test_compiled_step_matches_the_reference(dtype, shape, layout, output_scale, affine) -> None:
    """Output and the gradients of x, the mixture, weight and bias agree with :func:`group_mix_norm` (computed
    in float64 from the same inputs) to a few hundred ulps of the kernels' dtype."""
    x, groups, num_groups, mixing, weight, bias, upstream = _inputs(shape, dtype, layout, affine)
    torch.manual_seed(0)
    leaves = {"x": x, "mixing": mixing, "weight": None if weight is None else weight.to(dtype),
              "bias": None if bias is None else bias.to(dtype)}
    leaves = {k: v.clone().requires_grad_() for k, v in leaves.items() if v is not None}
    reference_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    assert FC.applies(leaves["x"], groups, leaves.get("weight"), leaves.get("bias"), mixing=leaves["mixing"])

    same_dtype = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    outputs = []
    for function, named in ((F.fused_group_mix_norm, leaves), (F.group_mix_norm, reference_leaves),
                            (F.group_mix_norm, same_dtype)):
        y = function(named["x"], groups, named["mixing"], num_groups=num_groups, weight=named.get("weight"),
                     bias=named.get("bias"), output_scale=output_scale)
        outputs.append((y, torch.autograd.grad((y * upstream.to(y.dtype)).sum(), list(named.values()))))
    (y, grads), (expected_y, expected_grads), (own_y, own_grads) = outputs
    assert y.dtype == dtype

    def error(got, expected):
        return float((got.detach().double() - expected.detach()).abs().max())

    torch.testing.assert_close(y.double(), expected_y, **_tolerance(expected_y, dtype, error(own_y, expected_y)))
    for name, got, expected, own in zip(leaves, grads, expected_grads, own_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), expected, **_tolerance(expected, dtype, error(own, expected)),
                                   msg=name)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_moments_stay_accurate_when_the_mean_dwarfs_the_spread(dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    groups = torch.arange(400) % 2
    x = (1e4 + torch.randn(400, 3, dtype=torch.float64, generator=gen) * (1 + groups[:, None])).to(dtype)
    mixing = torch.tensor([0.3, 0.7], dtype=dtype)
    stats = torch.from_numpy(FC.shared_mix_norm(x, groups, mixing, None, None, 1e-5, True).stats)
    x64 = x.double()
    for g in range(2):
        # float32 holds 1e4 to about 1e-3: its spread of about 1 keeps three or four digits, float64 twelve.
        expected = x64[groups == g].var(0, unbiased=False)
        torch.testing.assert_close(stats[2 + g].double(), expected, rtol=1e-3 if dtype == torch.float32 else 1e-10,
                                   atol=0)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(130, 5), (70, 2, 3, 3)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_moments_and_their_gradients_match_the_reference(dtype, shape, layout) -> None:
    """With the moments as outputs (an alignment penalty on them), the moments and the gradients of output
    and penalty together agree with plain autograd (in float64 from the same inputs)."""
    from groupmixnorm.nn import _kernels as K

    x, groups, num_groups, mixing, weight, bias, upstream = _inputs(shape, dtype, layout, affine=True)
    leaves = {"x": x, "mixing": mixing, "weight": weight.to(dtype), "bias": bias.to(dtype)}
    leaves = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    reference = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    assert FC.applies(leaves["x"], groups, leaves["weight"], leaves["bias"], mixing=leaves["mixing"])
    counts, segments = K.counts_and_segments(groups, num_groups, F.values_per_sample(x), dtype)
    y, moments, _ = K.shared_mix_norm(leaves["x"], segments, counts, leaves["mixing"], 1e-5, "batch",
                                      leaves["weight"], leaves["bias"], with_moments=True)
    assert moments is not None and all(part.requires_grad for part in moments[1:])
    expected_moments = F.plain_group_moments(reference["x"], groups, num_groups)
    expected_y = F.mix_normalize(reference["x"], groups, reference["mixing"], expected_moments, eps=1e-5,
                                 output_scale="batch", weight=reference["weight"], bias=reference["bias"])
    for got, want in zip(moments, expected_moments):
        torch.testing.assert_close(got.double(), want, **_tolerance(want, dtype))

    def loss(out, parts, inputs):
        return (out * upstream.to(out.dtype)).sum() + 3.0 * F.alignment_penalty(inputs, groups, parts, eps=1e-5)

    grads = torch.autograd.grad(loss(y, moments, leaves["x"]), list(leaves.values()))
    expected = torch.autograd.grad(loss(expected_y, expected_moments, reference["x"]), list(reference.values()))
    torch.testing.assert_close(y.double(), expected_y, **_tolerance(expected_y, dtype))
    for name, got, want in zip(leaves, grads, expected):
        # The penalty divides by the group deviations, which the degenerate layouts make small: its
        # gradients are then worse conditioned than the output's, and get the loose end of the ulps.
        torch.testing.assert_close(got.double(), want, **_tolerance(want, dtype, ulps=4000), msg=name)


def _twin_layers(make, steps: int, x, groups, upstream):
    """The same layer trained ``steps`` steps on the compiled path and on the torch path, same draws."""
    results = []
    for compiled in (True, False):
        torch.manual_seed(5)
        layer = make()
        with torch.no_grad():
            if layer.affine:
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.normal_()
        outputs = []
        for _ in range(steps):
            leaf = x.clone().requires_grad_()
            if compiled:
                y = layer(leaf, groups)
            else:
                with FC.torch_path():
                    y = layer(leaf, groups)
            y.backward(upstream)
            grads = [leaf.grad] + ([layer.weight.grad.clone(), layer.bias.grad.clone()] if layer.affine else [])
            layer.zero_grad(set_to_none=True)
            outputs.append((y.detach(), grads))
        results.append((layer, outputs))
    return results


@needs_numba
@pytest.mark.parametrize(
    "options",
    [{}, {"momentum": None}, {"num_groups": None}, {"affine": False, "output_scale": "mixed"},
     {"track_running_stats": False}],
    ids=["default", "cumulative", "no-num-groups", "mixed-no-affine", "no-running-stats"],
)
@pytest.mark.parametrize("layout", ["plain", "degenerate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_steps_and_running_statistics_match_the_torch_path(options, layout, dtype) -> None:
    x, groups, num_groups, _, _, _, upstream = _inputs((40, 6), dtype, layout, affine=False, seed=3)
    settings = {"num_groups": num_groups, **options}
    (compiled, compiled_out), (plain, plain_out) = _twin_layers(
        lambda: GroupMixNorm1d(6, dtype=dtype, **settings), 3, x, groups, upstream)
    for (y, grads), (want_y, want_grads) in zip(compiled_out, plain_out):
        torch.testing.assert_close(y, want_y, **_tolerance(want_y, dtype))
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, **_tolerance(want, dtype))
    for (name, got), (_, want) in zip(compiled.named_buffers(), plain.named_buffers()):
        if want.dtype.is_floating_point:
            torch.testing.assert_close(got, want, **_tolerance(want, dtype), msg=name)
        else:
            assert torch.equal(got, want), name


@needs_numba
@pytest.mark.parametrize("condition", [False, True], ids=["penalty", "conditional-penalty"])
def test_module_steps_with_an_alignment_penalty_match_the_torch_path(condition, monkeypatch) -> None:
    """Inside collect_alignment the layer still takes the compiled kernels, and its output, penalty and
    gradients (through both) are the torch path's."""
    from groupmixnorm.nn import collect_alignment

    x, groups, num_groups, _, _, _, upstream = _inputs((40, 6), torch.float32, "degenerate", affine=False, seed=3)
    labels = torch.arange(40) % 2 if condition else None
    calls = []
    original = FC.shared_mix_norm
    monkeypatch.setattr(FC, "shared_mix_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    results = []
    for compiled in (True, False):
        torch.manual_seed(5)
        layer = GroupMixNorm1d(6, num_groups=num_groups)
        leaf = x.clone().requires_grad_()
        with collect_alignment(labels) as penalties, (contextlib.nullcontext() if compiled else FC.torch_path()):
            y = layer(leaf, groups)
        penalty, = penalties
        ((y * upstream).sum() + 2.0 * penalty).backward()
        results.append((y.detach(), penalty.detach(), leaf.grad, layer.weight.grad, layer.bias.grad))
    assert len(calls) == 1
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **_tolerance(want, torch.float32, ulps=4000))


@needs_numba
def test_cached_views_follow_the_layers_tensors_when_they_move_or_are_copied() -> None:
    """The kernels' views of the parameters and buffers (ViewCache) never write into a tensor the layer no
    longer owns: after a deep copy, a pickle round trip, a cast and a reassigned buffer, each layer's step
    updates its own running statistics only, and reads its own (optimizer-updated) weight."""
    import copy
    import pickle

    x, groups = torch.randn(32, 3), torch.arange(32) % 2
    layer = GroupMixNorm1d(3, num_groups=2)
    layer(x, groups)
    twin = copy.deepcopy(layer)
    thawed = pickle.loads(pickle.dumps(layer))
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    twin(x, groups)
    thawed(x, groups)
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert int(twin.num_batches_tracked) == int(thawed.num_batches_tracked) == 2
    with torch.no_grad():
        layer.weight.mul_(3.0)  # in place, as an optimizer updates it
    torch.manual_seed(0)
    y = layer(x, groups)
    torch.manual_seed(0)
    with FC.torch_path():
        want = copy.deepcopy(layer)(x, groups)
    torch.testing.assert_close(y, want)
    layer.running_mean = torch.zeros(3)  # a new buffer: the step updates it, not the old one
    layer(x, groups)
    assert not torch.equal(layer.running_mean, torch.zeros(3)) and int(layer.num_batches_tracked) == 3
    wide = layer.double()
    wide(x.double(), groups)
    assert wide.running_mean.dtype == torch.float64 and int(wide.num_batches_tracked) == 4


@needs_numba
def test_image_layer_running_statistics_match_the_torch_path() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 4, 5, generator=gen) + 2
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    (compiled, out), (plain, want) = _twin_layers(lambda: GroupMixNorm2d(3, num_groups=3), 2, x, groups,
                                                  torch.randn(6, 3, 4, 5, generator=gen))
    torch.testing.assert_close(out[-1][0], want[-1][0], **_tolerance(want[-1][0], torch.float32))
    for (name, got), (_, expected) in zip(compiled.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(got, expected, **_tolerance(expected, torch.float32) if got.is_floating_point() else
                                   {"atol": 0, "rtol": 0}, msg=name)


@needs_numba
def test_non_finite_batch_raises_and_leaves_the_running_statistics_alone() -> None:
    layer = GroupMixNorm1d(3, num_groups=2)
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    with pytest.raises(NonFiniteStatistics, match=r"channel\(s\) \[1\]"):
        layer(x, torch.arange(8) % 2)
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, before[name]), name


@needs_numba
def test_the_rule_picks_the_compiled_kernels_where_it_should(monkeypatch) -> None:
    x, groups = torch.randn(32, 4), torch.arange(32) % 2
    # Compile first (compiling runs the kernels once).
    assert FC.applies(x, groups, None, None) and FC.applies(x.double(), groups, None, None)
    calls = []
    original = FC.shared_mix_norm
    monkeypatch.setattr(FC, "shared_mix_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    mixing = torch.tensor([0.4, 0.6])
    layer = GroupMixNorm1d(4, num_groups=2)
    layer(x, groups)
    assert len(calls) == 1
    with FC.torch_path():
        layer(x, groups)
        assert not FC.applies(x, groups, None, None, mixing=mixing)
    assert len(calls) == 1
    GroupMixNorm1d(4, num_groups=2, mix="pairwise")(x, groups)
    assert len(calls) == 1
    # float16 running statistics: the kernels normalize (in float32), torch updates the running statistics.
    half = GroupMixNorm1d(4, num_groups=2).half()
    half(x.half(), groups)
    assert len(calls) == 2 and int(half.num_batches_tracked) == 1
    assert FC.applies(x, groups, None, None, mixing=mixing)
    assert FC.applies(x.double(), groups, None, None, mixing=mixing.double())
    assert not FC.applies(x, groups, None, None, mixing=torch.full((32, 2), 0.5))  # one mixture per sample
    assert not FC.applies(x.half(), groups, None, None)
    assert not FC.applies(x.t(), groups, None, None)  # not contiguous
    assert not FC.applies(x, groups.int(), None, None)
    assert not FC.applies(x, groups, None, None, running_dtype=torch.float16)
    big = torch.empty(FC.SERIAL_MAX_ELEMENTS + 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert FC.applies(big.view(-1, 1), torch.zeros(big.numel(), dtype=torch.long), None, None)
        torch.set_num_threads(2)
        assert not FC.applies(big.view(-1, 1), torch.zeros(big.numel(), dtype=torch.long), None, None)
        assert FC.applies(x, groups, None, None)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(FC, "AVAILABLE", False)
    assert not FC.applies(x, groups, None, None)
    layer(x, groups)
    assert len(calls) == 2


def test_a_retained_graph_gives_the_same_gradients_each_time() -> None:
    """The backward reads the forward's table without changing it, so a second backward through a retained
    graph gives the first one's gradients again."""
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    groups = torch.arange(40) % 5
    out = GroupMixNorm1d(6, num_groups=5, dtype=torch.float64)(x, groups)
    upstream = torch.randn_like(out)
    first = torch.autograd.grad(out, x, upstream, retain_graph=True)[0]
    second = torch.autograd.grad(out, x, upstream)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_first_step_without_autograd_compiles_the_kernels(mode, monkeypatch) -> None:
    """The one-time trial compile runs with autograd on whatever mode the first caller is in (a training
    step under ``torch.no_grad()`` recalibrating statistics), and a failed trial is not tried again."""
    monkeypatch.setattr(FC, "_compiled", {})
    x, groups = torch.randn(32, 4), torch.arange(32) % 2
    with mode():
        assert FC.applies(x, groups, None, None)
        GroupMixNorm1d(4, num_groups=2)(x, groups)
    assert FC._compiled == {torch.float32: True}
    monkeypatch.setattr(FC, "_compiled", {})
    trials = []
    monkeypatch.setattr(FC, "shared_mix_norm", lambda *a, **k: trials.append(1) or 1 / 0)
    assert not FC.applies(x, groups, None, None) and not FC.applies(x, groups, None, None)
    assert trials == [1] and FC._compiled == {torch.float32: False}


def test_the_layer_trains_without_numba() -> None:
    """With numba unimportable the package imports, the rule says no, and a training step runs."""
    script = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from groupmixnorm.nn import GroupMixNorm1d, _fused_cpu\n"
        "assert not _fused_cpu.AVAILABLE\n"
        "x = torch.randn(16, 3, requires_grad=True)\n"
        "GroupMixNorm1d(3, num_groups=2)(x, torch.arange(16) % 2).sum().backward()\n"
        "assert torch.isfinite(x.grad).all()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok" and result.stderr == ""
