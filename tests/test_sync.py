"""SyncGroupMixNorm: two gloo processes on loopback against one process holding the whole batch."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from groupmixnorm.nn import (
    GroupMixNorm1d, GroupMixNorm2d, SyncGroupMixNorm, collect_alignment, convert_sync_groupmixnorm, mix_within,
    use_groups,
)

WORLD = 2

# Each case: the global batch's shape, its group ids, layer options, and how many training calls to make.
# In "rare", group 2 has two samples, both on rank 0; in "images", rank 1 holds a single image of group 1.
CASES = {
    "rare": dict(shape=(16, 3), groups=[0, 1, 2, 2, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 1], options={}, calls=2),
    "images": dict(shape=(6, 2, 3, 3), groups=[0, 0, 1, 0, 1, 0], options={}, calls=1),
    "sometimes-mixed": dict(shape=(12, 4), groups=[0, 1] * 6, options={"p": 0.5, "output_scale": "mixed"}, calls=4),
    "single-group-rank": dict(shape=(8, 2), groups=[0, 0, 0, 0, 1, 1, 1, 1], options={"alpha": 0.3}, calls=2),
    # A mean 10^7 times the spread: variances from sums of squares lose about 3 digits here even in float64.
    "far-from-zero": dict(shape=(12, 3), groups=[0, 1, 2] * 4, options={}, calls=1, offset=1e7),
}


def _inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(case["shape"], generator=generator, dtype=torch.float64) * 3 + 1 + case.get("offset", 0.0)
    weights = torch.randn(case["shape"], generator=generator, dtype=torch.float64)
    return x, torch.tensor(case["groups"]), weights


def _layer(case: dict, sync: bool) -> torch.nn.Module:
    channels = case["shape"][1]
    if sync:
        return SyncGroupMixNorm(channels, num_groups=3, dtype=torch.float64, **case["options"])
    kind = GroupMixNorm2d if len(case["shape"]) == 4 else GroupMixNorm1d
    return kind(channels, num_groups=3, dtype=torch.float64, **case["options"])


def _run(layer: torch.nn.Module, x: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor, calls: int) -> dict:
    """Train-mode calls on ``x``; the last call's output and input gradient, and the final running stats."""
    torch.manual_seed(123)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    torch.manual_seed(0)
    for _ in range(calls):
        x_leaf = x.clone().requires_grad_(True)
        layer.zero_grad()
        out = layer(x_leaf, groups)
        (out * weights).sum().backward()
    return {"out": out.detach(), "grad": x_leaf.grad, "weight_grad": layer.weight.grad.clone(),
            "bias_grad": layer.bias.grad.clone(), "buffers": {k: v.clone() for k, v in layer.named_buffers()}}


def _shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor.chunk(WORLD)[rank]


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, case in CASES.items():
            x, groups, weights = _inputs(case)
            results[name] = _run(_layer(case, sync=True), _shard(x, rank), _shard(groups, rank), _shard(weights, rank),
                                 case["calls"])
        for condition in (False, True):
            x, groups, labels = _alignment_inputs()
            results[f"alignment-{condition}"] = _penalty(
                SyncGroupMixNorm(3, num_groups=3, align_quantiles=4, dtype=torch.float64), _shard(x, rank),
                _shard(groups, rank), _shard(labels, rank) if condition else None)
        results["mix_within"] = _mix_within_refusal(*(_shard(t, rank) for t in _alignment_inputs()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while another still has work in flight
    finally:
        dist.destroy_process_group()


def _mix_within_refusal(x: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor) -> str:
    """What a synchronized layer says when asked to mix within labels across processes (every rank alike,
    before any collective call, so none waits on another)."""
    try:
        with mix_within(labels):
            SyncGroupMixNorm(3, num_groups=3, dtype=torch.float64)(x, groups)
    except ValueError as error:
        return str(error)
    return "no error"


def _alignment_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    groups = torch.tensor([0, 1, 2, 1] * 5 + [0, 1, 0])  # 23 rows: the processes hold 12 and 11
    x = torch.randn(len(groups), 3, generator=generator, dtype=torch.float64) + groups.unsqueeze(1).double()
    return x, groups, torch.randint(0, 2, (len(groups),), generator=generator)


def _penalty(layer: torch.nn.Module, x: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor | None) -> dict:
    x = x.clone().requires_grad_(True)
    with collect_alignment(labels) as penalties:
        layer(x, groups)
    total = sum(penalties)
    total.backward()
    return {"penalty": total.detach(), "grad": x.grad}


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("sync")
    mp.spawn(_worker, args=(str(folder / "store"), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]


def test_mixing_within_labels_across_processes_is_refused(distributed_results: list[dict]) -> None:
    for result in distributed_results:
        assert "does not mix within strata (mix_within) across processes" in result["mix_within"]


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process_on_the_whole_batch(distributed_results: list[dict], name: str) -> None:
    case = CASES[name]
    x, groups, weights = _inputs(case)
    reference = _run(_layer(case, sync=False), x, groups, weights, case["calls"])
    for rank, results in enumerate(distributed_results):
        got = results[name]
        torch.testing.assert_close(got["out"], _shard(reference["out"], rank), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["grad"], _shard(reference["grad"], rank), atol=1e-5, rtol=1e-5)
        for key, value in reference["buffers"].items():
            torch.testing.assert_close(got["buffers"][key], value, atol=1e-5, rtol=1e-5, msg=f"buffer {key}")
    # Without DDP each process holds its share of the parameter gradient; together they are the whole.
    for key in ("weight_grad", "bias_grad"):
        total = sum(results[name][key] for results in distributed_results)
        torch.testing.assert_close(total, reference[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("condition", [False, True])
def test_alignment_is_that_of_the_whole_batch(distributed_results: list[dict], condition: bool) -> None:
    """Every process holds the penalty of the concatenated batch (quantiles included, within each label
    for equalized odds); its slice's gradient is the sum over the processes' copies, so DDP's average over
    processes equals the single-process gradient."""
    x, groups, labels = _alignment_inputs()
    reference = _penalty(GroupMixNorm1d(3, num_groups=3, align_quantiles=4, dtype=torch.float64), x, groups,
                         labels if condition else None)
    chunks = [0, 12, 23]
    for rank, results in enumerate(distributed_results):
        got = results[f"alignment-{condition}"]
        torch.testing.assert_close(got["penalty"], reference["penalty"])
        torch.testing.assert_close(got["grad"] / WORLD, reference["grad"][chunks[rank]:chunks[rank + 1]])


def test_without_a_process_group_it_is_an_ordinary_layer() -> None:
    case = CASES["rare"]
    x, groups, weights = _inputs(case)
    local = _run(_layer(case, sync=True), x, groups, weights, case["calls"])
    reference = _run(_layer(case, sync=False), x, groups, weights, case["calls"])
    torch.testing.assert_close(local["out"], reference["out"])
    torch.testing.assert_close(local["grad"], reference["grad"])


def test_convert_keeps_options_parameters_and_statistics() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), GroupMixNorm1d(3, num_groups=2, alpha=0.5, align_quantiles=8),
                                torch.nn.Sequential(torch.nn.ReLU(), GroupMixNorm1d(3, num_groups=2, p=0.3)))
    x, groups = torch.randn(20, 4), torch.randint(0, 2, (20,))
    with use_groups(groups):
        model(x)
    model.eval()
    before = model(x)
    converted = convert_sync_groupmixnorm(model)
    layers = [m for m in converted.modules() if isinstance(m, SyncGroupMixNorm)]
    assert len(layers) == 2 and not converted.training
    assert (layers[0].alpha, layers[0].align_quantiles, layers[1].p) == (0.5, 8, 0.3)
    torch.testing.assert_close(converted(x), before)


def test_needs_num_groups_and_shared_mixing() -> None:
    with pytest.raises(ValueError, match="num_groups"):
        SyncGroupMixNorm(3)
    with pytest.raises(ValueError, match="shared"):
        SyncGroupMixNorm(3, num_groups=2, mix="pairwise")
    with pytest.raises(ValueError, match="num_groups"):
        convert_sync_groupmixnorm(torch.nn.Sequential(GroupMixNorm1d(3)))


def test_alignment_is_collected_outside_a_process_group() -> None:
    layer = SyncGroupMixNorm(2, num_groups=2)
    x = torch.randn(30, 2)
    groups = (torch.arange(30) % 2)
    x[groups == 1] += 2.0
    with collect_alignment() as penalties:
        layer(x, groups)
    assert len(penalties) == 1 and penalties[0].item() > 0.5


def _step_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 20, generator=generator)
    groups = torch.randint(0, 2, (128,), generator=generator)
    return x, (torch.rand(128, generator=generator) < 0.3 + 0.3 * groups).float(), groups


def _step_gradients(model: torch.nn.Module, method, batch) -> dict[str, torch.Tensor]:
    loss, _ = method.training_loss(model, batch)
    loss.backward()
    plain = model.module if hasattr(model, "module") else model
    return {name: parameter.grad.clone() for name, parameter in plain.named_parameters()}


def _ddp_step_worker(rank: int, store: str, out: str, options: dict) -> None:
    from groupmixnorm.methods import make_method
    from groupmixnorm.methods.base import Batch, ModelSpec
    from groupmixnorm.training.distributed import Workers, wrap_model

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        method = make_method("gmn", **options)
        workers = Workers(rank, WORLD)
        model = wrap_model(method.build_model(ModelSpec(20, 2, (16, 16))), workers)
        x, y, groups = _step_batch()
        rows = workers.shard(torch.arange(len(y)))
        torch.manual_seed(1)
        gradients = _step_gradients(model, method, Batch(x[rows], y[rows], groups[rows]))
        # DDP's reducer holds the process group and its gloo work: release it while the group is alive, so that
        # no gloo thread is torn down at interpreter exit (one such run aborted with SIGABRT in CI).
        del model
        gc.collect()
        if rank == 0:
            torch.save(gradients, out)
        dist.barrier()  # no rank tears gloo down while another still has work in flight
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("options", [{}, {"fairness": "eo"}, {"placement": "all", "align": 0.0}],
                         ids=["default", "equalized-odds", "paper-layer"])
def test_a_ddp_training_step_has_the_single_process_gradients(tmp_path: Path, options: dict) -> None:
    """The whole gmn loss (cross-entropy through synchronized layers, plus the alignment penalty of the whole
    batch) under DistributedDataParallel on 2 processes: the averaged parameter gradients are one process's."""
    from groupmixnorm.methods import make_method
    from groupmixnorm.methods.base import Batch, ModelSpec

    out = tmp_path / "gradients.pt"
    mp.spawn(_ddp_step_worker, args=(str(tmp_path / "store"), str(out), options), nprocs=WORLD, join=True)
    distributed = torch.load(out)
    torch.manual_seed(0)
    method = make_method("gmn", **options)
    model = method.build_model(ModelSpec(20, 2, (16, 16)))
    x, y, groups = _step_batch()
    torch.manual_seed(1)
    single = _step_gradients(model, method, Batch(x, y, groups))
    for name, gradient in single.items():
        torch.testing.assert_close(distributed[name], gradient, atol=1e-6, rtol=1e-4, msg=name)


def test_a_process_group_the_caller_joined_is_left_to_the_caller() -> None:
    from groupmixnorm.training import distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert distributed.workers_from_environment(torch.device("cpu")) == distributed.Workers(0, 1)
        distributed.leave_process_group()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    distributed.leave_process_group()  # nothing joined, nothing to leave: no error
    assert not dist.is_initialized()


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.mark.slow
def test_torchrun_training_matches_one_process(tmp_path: Path) -> None:
    """`torchrun -m groupmixnorm train` on 2 processes is the single-process run up to rounding, with the
    paper's layer in every hidden block; only rank 0 writes.

    What is guaranteed is the same computation in another summation order: the same batches, mixing draws
    and loss scaling, with float32 sums over half-batches (and one-pass moments) instead of whole ones. So the
    weights are compared with how far training moved them: a wrong batch, draw or scale changes every Adam
    step by O(lr), which makes the difference a sizeable part of the movement, while rounding leaves it
    orders of magnitude below (under 1e-4 of it here). The decisions are then compared by what the score
    differences allow: a row can change its decision only if its score lies within the largest score
    difference of the threshold.

    This needs every parameter's gradient to be nonzero where it is nonzero in exact arithmetic: Adam divides
    a gradient by its own size, so one that is zero but for rounding becomes a step of size lr in a random
    direction. The model builder leaves out the bias of a layer just before a normalization layer for that
    reason. The default placement (one layer on the logit) cannot be checked this way: the logit layer
    removes each group's shift of the logit, so a hidden unit active on every sample has a bias gradient
    that is zero in exact arithmetic; there the test of one training step above checks the gradients.
    """
    import json
    import subprocess
    import sys

    from groupmixnorm.experiments.spec import load_run_data
    from groupmixnorm.methods.base import ModelSpec
    from groupmixnorm.training.checkpoint import load_checkpoint
    from groupmixnorm.training.loop import seed_everything

    train = ["train", "--dataset", "adult", "--method", "gmn", "--placement", "all", "--align", "0", "--epochs", "1",
             "--iterations", "6", "--batch-size", "128", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "groupmixnorm"],
        "one": [sys.executable, "-m", "groupmixnorm"],
    }
    for name, command in runs.items():
        out = tmp_path / name
        done = subprocess.run([*command, *train, "--out", str(out), "--save", str(out / "model.pt")],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["metrics.json", "model.pt"]

    one, two = (load_checkpoint(tmp_path / name / "model.pt") for name in ("one", "two"))
    seed_everything(0)  # the run's seed: the weights the loop starts from
    spec = ModelSpec(one.model[0].in_features, len(one.group_names), tuple(one.spec["config"]["hidden"]))
    start = _parameters(one.method.build_model(spec))
    trained_one, trained_two = _parameters(one.model), _parameters(two.model)
    for name, start_value in start.items():
        moved = (trained_one[name] - start_value).norm()
        assert moved > 0, name
        assert (trained_two[name] - trained_one[name]).norm() <= 1e-2 * moved, name

    data = load_run_data(one.spec)
    x = torch.as_tensor(data.test.X, dtype=torch.float32)
    with torch.no_grad():
        scores_one, scores_two = (torch.sigmoid(model.model(x).squeeze(-1)).double() for model in (one, two))
    largest = float((scores_one - scores_two).abs().max())
    may_flip = float(((scores_one - 0.5).abs() <= largest).double().mean())
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in runs}
    assert abs(metrics["two"]["accuracy"] - metrics["one"]["accuracy"]) <= may_flip
    assert [row["train_bce"] for row in metrics["two"]["history"]] == pytest.approx(
        [row["train_bce"] for row in metrics["one"]["history"]], rel=1e-3)  # whole batches' losses, not rank 0's
