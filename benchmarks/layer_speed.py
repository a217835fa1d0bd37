"""Training-step speed of GroupMixNorm against batch normalization on the CPU.

Times one training step (forward and backward, upstream gradient of ones, module in training mode) of
``GroupMixNorm1d`` against ``torch.nn.BatchNorm1d`` and of ``GroupMixNorm2d`` against ``BatchNorm2d``,
in one process, alternating the two layers step by step so that both see the same machine load, and
reports the medians, their ratio and the peak memory of one step.

Two clocks are read around every step: wall time and the thread's CPU time. On a machine shared with
other jobs the CPU-time ratio is the steadier of the two (it leaves out time spent descheduled).

Peak memory counts the bytes created during one step (forward, backward and the input gradient; the
input and the upstream gradient exist before) that are alive at the same time: tensor storages, tracked
with a ``TorchDispatchMode``, and what Python's allocators hand out, tracked with ``tracemalloc``: NumPy
arrays and, with numba told to allocate through Python (:func:`trace_numba_arrays`), the numba kernels'
work arrays. That is the layer's working set, not the process's resident size. The tensors alone are
reported too (``tensor ratio``), as the tables before the kernels' work arrays were counted did.

glibc returns freed heap memory at the top of the heap to the system once more than twice the largest
recently freed block is free, so a step that allocates a few batch-sized buffers may fault all their
pages in again on every step, which can cost as much as the arithmetic (for both layers). ``--steady-malloc``
re-runs the script with ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TOP_PAD_`` set so that
freed memory is kept and reused, which shows the cost of the computation alone.

    python benchmarks/layer_speed.py             # the full table
    python benchmarks/layer_speed.py --quick     # a small subset, for a smoke test
    python benchmarks/layer_speed.py --pairwise  # also mix="pairwise"
    python benchmarks/layer_speed.py --markdown docs/results/speed.md   # also write the table there
    python benchmarks/layer_speed.py --compile   # also torch.compile both layers on two shapes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from groupmixnorm.nn import GroupMixNorm1d, GroupMixNorm2d
from groupmixnorm.nn import _fused_cpu

_STEADY_MALLOC = {"MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TOP_PAD_": "268435456"}


class PeakMemory(TorchDispatchMode):
    """Peak bytes alive at once among those created inside the block: tensor storages (``tensor_peak``),
    and those together with the blocks of Python's allocators that ``tracemalloc`` sees (``peak``).

    Tensor storages change only inside an ATen call, so between two calls their total is known; the
    Python-side peak between two calls (``tracemalloc``'s, reset at every call) is added to the tensors'
    total of that interval. A tensor freed within the interval is still counted, so ``peak`` errs high.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.tensor_peak = 0
        self.peak = 0
        self._started_tracing = False
        self._python_base = 0

    def __enter__(self):  # noqa: ANN204
        self._started_tracing = not tracemalloc.is_tracing()
        if self._started_tracing:
            tracemalloc.start()
        self._python_base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        return super().__enter__()

    def __exit__(self, *exc_info):  # noqa: ANN001, ANN204
        self._close_interval()
        if self._started_tracing:
            tracemalloc.stop()
        return super().__exit__(*exc_info)

    def _close_interval(self) -> None:
        """Fold the Python-side peak since the last ATen call into ``peak`` and start a new interval."""
        python_peak = tracemalloc.get_traced_memory()[1] - self._python_base
        self.peak = max(self.peak, self.current + python_peak)
        tracemalloc.reset_peak()

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._close_interval()
        out = func(*args, **(kwargs or {}))
        # A view, an in-place op or an out= argument hands back an argument's storage: nothing new. (Counting
        # those would count the step's input and upstream gradient, made before the step, whenever the layer
        # takes a view of them.)
        given = {id(value.untyped_storage()) for value in tree_flatten((args, kwargs))[0]
                 if isinstance(value, torch.Tensor)}
        for value in tree_flatten(out)[0]:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            key, size = id(storage), storage.nbytes()
            if size == 0 or key in self.live or key in given:
                continue
            self.live[key] = size
            self.current += size
            self.tensor_peak = max(self.tensor_peak, self.current)
            weakref.finalize(storage, self._release, key)
        self._close_interval()
        return out


def trace_numba_arrays() -> bool:
    """Make numba's runtime allocate through Python's raw allocator, which ``tracemalloc`` traces, so that
    :class:`PeakMemory` sees the kernels' work arrays. Must run before numba allocates anything; ``False``
    where this numba has no such switch (a private one: ``_nrt_python.memsys_use_cpython_allocator``)."""
    try:
        from numba.core.runtime import _nrt_python
        _nrt_python.memsys_use_cpython_allocator()
    except (ImportError, AttributeError):
        return False
    return True


def make_step(layer: nn.Module, x: torch.Tensor, groups: torch.Tensor | None) -> Callable[[], None]:
    upstream = torch.ones_like(x)

    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out = layer(x, groups) if groups is not None else layer(x)
        out.backward(upstream)

    return step


def compare(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, CPU seconds) per step of each callable, timed in alternation."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            step()
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in steps}


def peak_bytes(step: Callable[[], None]) -> tuple[int, int]:
    """The peak of everything one step creates, and of its tensors alone (:class:`PeakMemory`), from the
    second of two tracked steps: the first tracked step of a process also holds what the tracking itself
    loads on first use (modules imported lazily, caches), megabytes that belong to neither layer."""
    for _ in range(2):
        with PeakMemory() as tracker:
            step()
    return tracker.peak, tracker.tensor_peak


def repeats_for(numel: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    if numel <= 1 << 18:
        return 200
    if numel <= 1 << 21:
        return 60
    if numel <= 1 << 23:
        return 20
    return 8


def run_case(kind: str, shape: tuple[int, ...], num_groups: int, mix: str, repeats: int | None) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).requires_grad_()
    groups = torch.randint(0, num_groups, (shape[0],), generator=gen)
    channels = shape[1]
    if kind == "1d":
        gmn, bn = GroupMixNorm1d(channels, num_groups=num_groups, mix=mix), nn.BatchNorm1d(channels)
    else:
        gmn, bn = GroupMixNorm2d(channels, num_groups=num_groups, mix=mix), nn.BatchNorm2d(channels)
    steps = {"gmn": make_step(gmn, x, groups), "bn": make_step(bn, x, None)}
    compiled = mix == "shared" and _fused_cpu.applies(x, groups, gmn.weight, gmn.bias,
                                                       running_dtype=gmn.running_mean.dtype)
    count = repeats_for(x.numel(), repeats)
    medians = compare(steps, count, warmup=max(2, count // 10))
    return {
        "shape": shape,
        "G": num_groups,
        "mix": mix,
        "path": "numba" if compiled else "torch",
        "gmn_ms": medians["gmn"][0] * 1e3,
        "bn_ms": medians["bn"][0] * 1e3,
        "ratio": medians["gmn"][0] / medians["bn"][0],
        "cpu_ratio": medians["gmn"][1] / medians["bn"][1],
        **memory_columns(peak_bytes(steps["gmn"]), peak_bytes(steps["bn"])),
        "repeats": count,
    }


def memory_columns(gmn: tuple[int, int], bn: tuple[int, int]) -> dict[str, float]:
    """The table's memory columns from the two layers' (all, tensors only) peaks."""
    return {"gmn_mib": gmn[0] / 2**20, "bn_mib": bn[0] / 2**20, "memory_ratio": gmn[0] / bn[0],
            "tensor_ratio": gmn[1] / bn[1]}


COMPILE_CASES = (("1d", (4096, 64), 8), ("2d", (16, 64, 16, 16), 2))
FLOOR_SHAPES = ((256, 64), (256, 512), (4096, 64))


class _Nothing(torch.autograd.Function):
    """A layer step that computes nothing, with what any Python layer pays: an autograd function called
    from Python each way, fresh output and input-gradient tensors, gradients for a weight and a bias."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        return torch.empty_like(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):  # noqa: ANN001, ANN205
        x, = ctx.saved_tensors
        return torch.empty_like(x), torch.zeros(x.shape[1]), torch.zeros(x.shape[1])


class PythonFloor(nn.Module):
    """:class:`_Nothing` as a module with BatchNorm's parameters: the floor under any layer written in Python."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        return _Nothing.apply(x, self.weight, self.bias)


def floor_case(shape: tuple[int, int], repeats: int | None) -> dict:
    """The step time of :class:`PythonFloor` against BatchNorm1d's, alternating as :func:`run_case` does."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    steps = {"floor": make_step(PythonFloor(shape[1]), x, None), "bn": make_step(nn.BatchNorm1d(shape[1]), x, None)}
    medians = compare(steps, repeats_for(x.numel(), repeats), warmup=20)
    return {"shape": shape, "floor_ms": medians["floor"][0] * 1e3, "bn_ms": medians["bn"][0] * 1e3,
            "ratio": medians["floor"][0] / medians["bn"][0]}


def compile_case(kind: str, shape: tuple[int, ...], num_groups: int, repeats: int = 30) -> dict:
    """Eager and ``torch.compile`` step times of both layers; a layer that fails to compile says why."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).requires_grad_()
    groups = torch.randint(0, num_groups, (shape[0],), generator=gen)
    bn = (nn.BatchNorm1d if kind == "1d" else nn.BatchNorm2d)(shape[1])
    gmn = (GroupMixNorm1d if kind == "1d" else GroupMixNorm2d)(shape[1], num_groups=num_groups)
    steps = {"bn_eager": make_step(bn, x, None), "bn_compiled": make_step(torch.compile(bn), x, None),
             "gmn_eager": make_step(gmn, x, groups)}
    row = {"kind": kind, "shape": shape, "G": num_groups}
    try:
        compiled_gmn = make_step(torch.compile(gmn), x, groups)
        compiled_gmn()
        steps["gmn_compiled"] = compiled_gmn
    except Exception as error:  # noqa: BLE001 - report any compiler failure, whatever its type
        row["gmn_compiled"] = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    medians = compare(steps, repeats, warmup=3)
    row.update({f"{name}_ms": wall * 1e3 for name, (wall, _) in medians.items()})
    if "gmn_compiled_ms" in row:
        row["gmn_compiled"] = f"{row['gmn_compiled_ms']:.3f} ms"
    return row


def write_markdown(
    path: str, rows: list[dict], compiled: list[dict], floors: list[dict], malloc: str, numba_traced: bool,
) -> None:
    """The results as a markdown page, written atomically (a temporary file renamed into place)."""
    command = "python " + " ".join(["benchmarks/layer_speed.py", *sys.argv[1:]])
    lines = [
        "# Speed: GroupMixNorm against BatchNorm (CPU)", "",
        f"Generated by `{command}`: torch {torch.__version__}, {torch.get_num_threads()} thread(s), malloc {malloc}. "
        "One training step (forward and backward) per layer, the two layers alternating step by step so that both "
        "see the same machine load; medians. `ratio` divides wall times, `cpu ratio` thread CPU times (the steadier "
        "of the two on a shared machine). `path` is the kernel GroupMixNorm's step ran on: `numba`, the compiled "
        "CPU kernels (`groupmixnorm/nn/_fused_cpu.py`), or `torch`, the hand-written autograd functions of ATen "
        "operations (`_kernels.py`). Peak memory counts what one step creates (not the input, the upper gradient or "
        "views of them) that is alive at once: tensor storages and the blocks of Python's allocators, NumPy arrays "
        + ("and the numba kernels' work arrays (numba allocating through Python for this run) included; "
           if numba_traced else "included, but not the numba kernels' work arrays (this numba cannot allocate "
           "through Python); ")
        + "`memory ratio` divides the two layers' peaks, `tensor ratio` the peaks of their tensors alone.", "",
        "| layer | shape | groups | path | GMN ms | BN ms | ratio | cpu ratio | GMN MiB | BN MiB | memory ratio | tensor ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['kind']} {row['mix']} | {tuple(row['shape'])} | {row['G']} | {row['path']} | {row['gmn_ms']:.3f} | "
                     f"{row['bn_ms']:.3f} | {row['ratio']:.2f} | {row['cpu_ratio']:.2f} | {row['gmn_mib']:.2f} | "
                     f"{row['bn_mib']:.2f} | {row['memory_ratio']:.2f} | {row['tensor_ratio']:.2f} |")
    lines += ["", "## Flat in the number of groups", "",
              "Ratio at the most groups over ratio at the fewest, per shape (1.00 = no cost for more groups):", ""]
    by_shape: dict[tuple, list[dict]] = {}
    for row in rows:
        by_shape.setdefault((row["kind"], row["mix"], tuple(row["shape"])), []).append(row)
    for (kind, mix, shape), group_rows in by_shape.items():
        group_rows.sort(key=lambda r: r["G"])
        if len(group_rows) > 1:
            first, last = group_rows[0], group_rows[-1]
            lines.append(f"- {kind} {shape}: G={last['G']} vs G={first['G']}: {last['ratio'] / first['ratio']:.2f}")
    if floors:
        lines += ["", "## The floor of a layer written in Python", "",
                  "A layer whose forward and backward are Python (an autograd function, as GroupMixNorm's are) pays "
                  "for the calls, the output and gradient tensors and the parameters' gradients whatever it "
                  "computes. `PythonFloor` in this script computes nothing and pays only that; its step against "
                  "BatchNorm's (C++ throughout), timed in the same alternation:", "",
                  "| shape | floor ms | BN ms | floor / BN |", "|---|---|---|---|"]
        for row in floors:
            lines.append(f"| {tuple(row['shape'])} | {row['floor_ms']:.3f} | {row['bn_ms']:.3f} | {row['ratio']:.2f} |")
    if compiled:
        lines += ["", "## torch.compile", "", "GMN eager runs the numba kernels; a compiled GMN traces the plain-autograd "
                  "reference (`group_mix_norm`), which the compiler fuses.", "", "| layer | shape | groups | BN eager ms | BN compiled ms | GMN eager ms | GMN compiled |",
                  "|---|---|---|---|---|---|---|"]
        for row in compiled:
            lines.append(f"| {row['kind']} | {tuple(row['shape'])} | {row['G']} | {row['bn_eager_ms']:.3f} | "
                         f"{row['bn_compiled_ms']:.3f} | {row['gmn_eager_ms']:.3f} | {row['gmn_compiled']} |")
    target = os.path.abspath(path)
    temporary = f"{target}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(temporary, target)
    print(f"wrote {path}")


def cases(quick: bool, mixes: list[str]) -> list[tuple[str, tuple[int, ...], int, str]]:
    sizes = [256, 4096] if quick else [256, 4096, 65536]
    channels = [64] if quick else [64, 512]
    group_counts = [2, 64] if quick else [2, 8, 64]
    out = [("1d", (n, c), g, mix) for mix in mixes for n in sizes for c in channels for g in group_counts]
    image = (16, 64, 16, 16) if quick else (64, 64, 32, 32)
    out += [("2d", image, g, mix) for mix in mixes for g in ([2] if quick else [2, 8])]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset of the sizes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per layer (default: by size)")
    parser.add_argument("--pairwise", action="store_true", help="also time mix='pairwise'")
    parser.add_argument("--steady-malloc", action="store_true", help="re-run with glibc told to keep freed memory")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd layers on two shapes")
    parser.add_argument("--markdown", default=None, help="also write the results as a markdown page to this path")
    args = parser.parse_args(argv)
    if args.steady_malloc and any(os.environ.get(k) != v for k, v in _STEADY_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_STEADY_MALLOC})
    numba_traced = trace_numba_arrays()  # before any kernel runs
    torch.set_num_threads(args.threads)
    mixes = ["shared", "pairwise"] if args.pairwise else ["shared"]
    malloc = "steady (freed memory kept)" if args.steady_malloc else "default"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), malloc {malloc}; medians of one training step")
    header = (f"{'layer':<5} {'shape':<18} {'G':>3} {'mix':<8} {'path':<6} {'GMN ms':>9} {'BN ms':>9} {'ratio':>6} {'cpu':>6} "
              f"{'GMN MiB':>8} {'BN MiB':>7} {'mem':>5} {'tensor':>6} {'reps':>5}")
    print(header)
    print("-" * len(header))
    rows = []
    for kind, shape, num_groups, mix in cases(args.quick, mixes):
        row = run_case(kind, shape, num_groups, mix, args.repeats)
        rows.append({"kind": kind, **row})
        print(
            f"{kind:<5} {str(row['shape']):<18} {row['G']:>3} {row['mix']:<8} {row['path']:<6} {row['gmn_ms']:>9.3f} {row['bn_ms']:>9.3f} "
            f"{row['ratio']:>6.2f} {row['cpu_ratio']:>6.2f} {row['gmn_mib']:>8.2f} {row['bn_mib']:>7.2f} "
            f"{row['memory_ratio']:>5.2f} {row['tensor_ratio']:>6.2f} {row['repeats']:>5}",
            flush=True,
        )
    print("ms: wall-clock medians; ratio: GMN / BN wall time; cpu: GMN / BN thread CPU time; "
          "MiB: peak of what one step creates (mem: GMN / BN), tensor: the same for tensors alone")
    floors = [floor_case(shape, args.repeats) for shape in FLOOR_SHAPES]
    for row in floors:
        print(f"python floor {row['shape']}: {row['floor_ms']:.3f} ms against BN {row['bn_ms']:.3f} ms ({row['ratio']:.2f})")
    compiled = [compile_case(kind, shape, g) for kind, shape, g in COMPILE_CASES] if args.compile else []
    for row in compiled:
        print(f"compiled {row['kind']} {row['shape']} G={row['G']}: BN eager {row['bn_eager_ms']:.3f} ms, "
              f"BN compiled {row['bn_compiled_ms']:.3f} ms, GMN eager {row['gmn_eager_ms']:.3f} ms, GMN compiled {row['gmn_compiled']}")
    if args.markdown:
        write_markdown(args.markdown, rows, compiled, floors, malloc, numba_traced)


if __name__ == "__main__":
    main()
