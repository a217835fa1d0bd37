"""Does a trained model's representation forget the protected attribute? Probes, MMD and embeddings.

For every hidden layer of a model (the output of each ReLU, of each GroupMixNorm layer, and the logit)
on the test split, three measurements:

- **probes**: a logistic regression and a small MLP trained to recover the protected group from the
  layer's features on one half of the test rows (stratified by group) and scored on the other half, by
  balanced accuracy and AUC (one-vs-rest, macro, for more than two groups). AUC is also taken either way
  round, ``max(AUC, 1 - AUC)`` (per group, then averaged): a probe whose scores order the groups the wrong
  way still shows they differ. That AUC near 0.5 (and balanced accuracy near ``1 / G``) means the features
  hold no recoverable trace of the attribute; the reported ``probe_*`` numbers are those of the probe with
  the higher AUC either way round. A group with fewer than :data:`MIN_PROBE_ROWS` rows in the scoring half
  is warned about (:class:`ProbeRowsWarning`): its numbers are noisy.
- **MMD**: the unbiased squared maximum mean discrepancy between groups (each group against the rest; the
  largest over groups) with an RBF kernel on standardized features, bandwidth by the median heuristic,
  and a permutation p-value (group labels shuffled, the kernel matrix reused).
- **embedding**: a 2-D PCA (or t-SNE) of the features, colored by group and by label (PNG).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from torch import nn

from groupmixnorm.data.csv import DataWarning
from groupmixnorm.files import atomic_output, write_json_atomic

EMBEDDINGS = ("pca", "tsne")
#: Rows of a group in the probes' scoring half below which their numbers are too noisy to read much into.
MIN_PROBE_ROWS = 50


class ProbeRowsWarning(DataWarning):
    """A group has too few rows in the probes' scoring half for their balanced accuracy and AUC to be reliable
    (a warning about the data: the command line prints it as one line)."""


@dataclass(frozen=True)
class AnalysisOptions:
    """How much data and effort the analysis spends; the defaults take seconds per layer."""

    seed: int = 0
    #: Rows of the test split used (a seeded subsample, stratified by group); ``None`` for all.
    max_rows: int | None = 4000
    #: Rows per group in the MMD test (the kernel matrix is quadratic in them).
    mmd_rows_per_group: int = 500
    permutations: int = 200
    embedding: str = "pca"


def layer_representations(model: nn.Module, forward: Any, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Features of every ReLU, every GroupMixNorm layer and the output, named in forward order, the output
    last.

    ``forward(x)`` runs the model (so that methods that route groups can do so). A tensor is reported once:
    when the output is a layer's output itself (a GroupMixNorm layer on the logit), it keeps that layer's
    name instead of ``logit``. Image features ``(N, C, H, W)`` are averaged over the spatial axes.
    """
    from groupmixnorm.nn.modules import _GroupMixNorm

    captured: dict[str, torch.Tensor] = {}
    counts = {"hidden": 0, "groupmixnorm": 0}
    handles = []

    def capture(kind: str):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            counts[kind] += 1
            captured[f"{kind}_{counts[kind]}"] = output.detach()
        return hook

    for module in model.modules():
        if isinstance(module, nn.ReLU):
            handles.append(module.register_forward_hook(capture("hidden")))
        elif isinstance(module, _GroupMixNorm):
            handles.append(module.register_forward_hook(capture("groupmixnorm")))
    try:
        with torch.no_grad():
            output = forward(x).detach().reshape(len(x), -1)
    finally:
        for handle in handles:
            handle.remove()
    captured = _once_each(captured)
    same = next((name for name, value in captured.items() if _same_tensor(value, output)), None)
    captured[same or "logit"] = captured.pop(same) if same else output  # the output goes last
    return {name: _as_rows(value) for name, value in captured.items()}


def _same_tensor(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether two tensors are views of the same memory, element for element (``detach`` and ``reshape``
    keep the memory)."""
    return first.data_ptr() == second.data_ptr() and first.numel() == second.numel()


def _once_each(captured: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``captured`` without the later names of a tensor seen before (a module hooked twice)."""
    kept: dict[str, torch.Tensor] = {}
    for name, value in captured.items():
        if not any(_same_tensor(value, other) for other in kept.values()):
            kept[name] = value
    return kept


def _as_rows(features: torch.Tensor) -> np.ndarray:
    if features.dim() > 2:
        features = features.flatten(2).mean(dim=2)
    return features.reshape(len(features), -1).double().cpu().numpy()


def probe_halves(groups: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the probes' training half and scoring half (stratified by group, seeded)."""
    train, test = train_test_split(np.arange(len(groups)), test_size=0.5, stratify=groups, random_state=seed)
    return train, test


def probe_scores(features: np.ndarray, groups: np.ndarray, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """Balanced accuracy, AUC and AUC either way round (see the module's note) of a logistic-regression and
    an MLP probe that predict ``groups`` from ``features``, trained on a stratified half and scored on the
    other half (:func:`probe_halves`)."""
    train, test = probe_halves(groups, seed)
    train_x, test_x, train_a, test_a = features[train], features[test], groups[train], groups[test]
    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    probes = {
        "logistic": LogisticRegression(max_iter=1000, class_weight="balanced"),
        "mlp": MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed),
    }
    scores = {}
    for name, probe in probes.items():
        with warnings.catch_warnings():
            # A probe stopped at its iteration budget is still a probe; its score is what we report.
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(train_x, train_a)
        probabilities = probe.predict_proba(test_x)
        auc = (roc_auc_score(test_a, probabilities[:, 1]) if probabilities.shape[1] == 2
               else roc_auc_score(test_a, probabilities, multi_class="ovr", average="macro"))
        scores[name] = {"balanced_accuracy": float(balanced_accuracy_score(test_a, probe.predict(test_x))),
                        "auc": float(auc), "auc_either_way": _auc_either_way(test_a, probabilities, probe.classes_)}
    return scores


def _auc_either_way(groups: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> float:
    """``max(AUC, 1 - AUC)`` of the probe's scores; for more than two groups, of each group against the
    rest, averaged."""
    if probabilities.shape[1] == 2:
        auc = roc_auc_score(groups == classes[1], probabilities[:, 1])
        return float(max(auc, 1.0 - auc))
    per_group = [roc_auc_score(groups == group, probabilities[:, column]) for column, group in enumerate(classes)]
    return float(np.mean([max(auc, 1.0 - auc) for auc in per_group]))


def strongest_probe(probes: dict[str, dict[str, float]]) -> tuple[str, float]:
    """The probe with the highest AUC either way round (ties: the higher balanced accuracy) and that AUC.
    Probes recorded without ``auc_either_way`` (older analyses of two groups) take ``max(auc, 1 - auc)``."""
    def either_way(score: dict[str, float]) -> float:
        return score.get("auc_either_way", max(score["auc"], 1.0 - score["auc"]))

    name = max(probes, key=lambda probe: (either_way(probes[probe]), probes[probe]["balanced_accuracy"]))
    return name, float(either_way(probes[name]))


def mmd_test(features: np.ndarray, groups: np.ndarray, *, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """The largest unbiased MMD^2 of one group against the rest (RBF kernel, median-heuristic bandwidth,
    standardized features) and its permutation p-value, ``(1 + #{permuted >= observed}) / (1 + permutations)``."""
    x = torch.as_tensor(StandardScaler().fit_transform(features), dtype=torch.float64)
    squared = torch.cdist(x, x).square_()
    off_diagonal = squared[~torch.eye(len(x), dtype=torch.bool)]
    bandwidth = float(off_diagonal.median()) if len(off_diagonal) else 1.0
    kernel = torch.exp(-squared / max(bandwidth, 1e-12))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(groups)
    shuffled = torch.stack([labels[torch.randperm(len(labels), generator=generator)] for _ in range(permutations)], 1)
    observed = _largest_mmd(kernel, labels.unsqueeze(1))[0]
    permuted = _largest_mmd(kernel, shuffled)
    p_value = (1 + int((permuted >= observed).sum())) / (1 + permutations)
    return float(observed), float(p_value)


def _largest_mmd(kernel: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per column of ``labels`` (n, P): the largest unbiased MMD^2 of a group against all other rows."""
    best = torch.full((labels.shape[1],), -torch.inf, dtype=kernel.dtype)
    for group in torch.unique(labels):
        inside = (labels == group).to(kernel.dtype)  # (n, P)
        outside = 1.0 - inside
        m, n = inside.sum(0), outside.sum(0)
        k_inside, k_outside = kernel @ inside, kernel @ outside
        within_in = ((inside * k_inside).sum(0) - m) / (m * (m - 1)).clamp_min(1)  # the kernel's diagonal is 1
        within_out = ((outside * k_outside).sum(0) - n) / (n * (n - 1)).clamp_min(1)
        between = (inside * k_outside).sum(0) / (m * n).clamp_min(1)
        best = torch.maximum(best, within_in + within_out - 2 * between)
    return best


def plot_embedding(features: np.ndarray, groups: np.ndarray, labels: np.ndarray, path: Path, *, title: str,
                   group_names: list[str], method: str = "pca", seed: int = 0) -> Path:
    """Two panels of a 2-D embedding of ``features``: colored by group, and by label (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaled = StandardScaler().fit_transform(features)
    if scaled.shape[1] == 1:
        points = np.column_stack([scaled[:, 0], np.random.default_rng(seed).uniform(-0.5, 0.5, len(scaled))])
    elif method == "tsne":
        from sklearn.manifold import TSNE

        points = TSNE(n_components=2, random_state=seed, init="pca").fit_transform(scaled)
    else:
        points = PCA(n_components=2, random_state=seed).fit_transform(scaled)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, values, names, heading in ((axes[0], groups, group_names, "by group"),
                                         (axes[1], labels, ["label 0", "label 1"], "by label")):
        for value in np.unique(values):
            chosen = values == value
            axis.scatter(points[chosen, 0], points[chosen, 1], s=4, alpha=0.4, label=names[int(value)])
        axis.set_title(f"{title}: {heading}")
        axis.legend(markerscale=3, fontsize=8)
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=90)
    plt.close(figure)
    return path


def analyze_split(model: nn.Module, method: Any, x: torch.Tensor, y: np.ndarray, a: np.ndarray, *,
                  group_names: list[str], options: AnalysisOptions = AnalysisOptions(),
                  plots_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Probe, MMD (and, with ``plots_dir``, embedding plots) for every layer of ``model`` on one split."""
    rows = _subsample(a, options.max_rows, options.seed)
    x, y, a = x[rows], y[rows], a[rows]
    model.eval()
    groups = torch.as_tensor(a)
    representations = layer_representations(model, lambda inputs: method.predict_logits(model, inputs, groups), x)
    _warn_few_probe_rows(a, group_names, options.seed)
    mmd_rows = _per_group_subsample(a, options.mmd_rows_per_group, options.seed)
    output = list(representations)[-1]
    results = {}
    for name, features in representations.items():
        probes = probe_scores(features, a, seed=options.seed)
        strongest, auc = strongest_probe(probes)
        mmd, p_value = mmd_test(features[mmd_rows], a[mmd_rows], permutations=options.permutations, seed=options.seed)
        results[name] = {
            "probe": strongest, "probe_balanced_accuracy": probes[strongest]["balanced_accuracy"], "probe_auc": auc,
            "mmd": mmd, "mmd_p_value": p_value, "probes": probes, "features": int(features.shape[1]),
            "output": name == output,
        }
        if plots_dir is not None:
            plot_embedding(features, a, y, plots_dir / f"embedding_{name}.png", title=name, group_names=group_names,
                           method=options.embedding, seed=options.seed)
    return results


def _warn_few_probe_rows(groups: np.ndarray, group_names: list[str], seed: int) -> None:
    """One :class:`ProbeRowsWarning` naming each group with fewer than :data:`MIN_PROBE_ROWS` scoring rows."""
    values, counts = np.unique(groups[probe_halves(groups, seed)[1]], return_counts=True)
    small = [f"{group_names[int(value)]!r} ({count} rows)" for value, count in zip(values, counts)
             if count < MIN_PROBE_ROWS]
    if small:
        warnings.warn(f"the probes are scored on half the analyzed rows, and there group {', '.join(small)} has "
                      f"fewer than {MIN_PROBE_ROWS}: its balanced accuracy and AUC are noisy",
                      ProbeRowsWarning, stacklevel=3)


def _subsample(groups: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Row indices: all, or a seeded subsample of ``limit`` stratified by group."""
    if limit is None or len(groups) <= limit:
        return np.arange(len(groups))
    chosen, _ = train_test_split(np.arange(len(groups)), train_size=limit, stratify=groups, random_state=seed)
    return np.sort(chosen)


def _per_group_subsample(groups: np.ndarray, per_group: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(groups == g))[:per_group] for g in np.unique(groups)]
    return np.sort(np.concatenate(picks))


def analyze_checkpoint(checkpoint_path: str | Path, out: str | Path | None, *,
                       options: AnalysisOptions = AnalysisOptions(),
                       data_file: str | Path | None = None) -> dict[str, Any]:
    """Analyze a checkpoint written by ``groupmixnorm train --save`` on its run's test split; write
    ``out/analysis.json`` and ``out/embedding_<layer>.png`` (nothing if ``out`` is ``None``) and return
    the analysis. ``data_file``: a copy of a CSV run's training file (checked by its sha256)."""
    from groupmixnorm.training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    return analyze_model(checkpoint.model, checkpoint.method, checkpoint.run_data(data_file), out, options=options,
                         about={"checkpoint": str(checkpoint_path), "method": checkpoint.spec["method"],
                                "method_options": checkpoint.spec["method_options"]})


def analyze_model(model: nn.Module, method: Any, data: Any, out: str | Path | None, *,
                  options: AnalysisOptions = AnalysisOptions(), about: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`analyze_checkpoint` for a model in memory (image models have no checkpoints): every layer on
    ``data``'s test split; ``about`` (what the model is) heads the analysis."""
    if options.embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {options.embedding!r}")
    test = data.test
    layers = analyze_split(
        model, method, torch.as_tensor(test.X, dtype=torch.float32), test.y, test.a,
        group_names=list(data.group_names), options=options, plots_dir=None if out is None else Path(out),
    )
    analysis = {
        **(about or {}), "sensitive": data.sensitive, "group_names": list(data.group_names),
        "chance_balanced_accuracy": 1.0 / data.num_groups, "options": options.__dict__, "layers": layers,
    }
    if out is not None:
        write_json_atomic(Path(out) / "analysis.json", analysis)
    return analysis
