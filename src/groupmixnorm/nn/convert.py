"""Putting GroupMixNorm into an existing model: replace its batch normalization, or add layers after blocks.

:func:`convert` works on any :class:`torch.nn.Module` (a torchvision ResNet, an ``nn.Sequential``, a model
of your own): it walks the named modules, so layers are chosen by their names as
``model.named_modules()`` lists them (``"layer1.0.bn1"``).

    >>> import torchvision                    # pip install "groupmixnorm[vision]"
    >>> model = convert(torchvision.models.resnet18(), num_groups=2)
    >>> with use_groups(a):
    ...     logits = model(images)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from groupmixnorm.nn.modules import GroupMixNorm1d, GroupMixNorm2d, _GroupMixNorm

#: Which layers to convert: ``None`` (all), module names, or a predicate ``(name, module) -> bool``.
Selection = None | Iterable[str] | Callable[[str, nn.Module], bool]

_REPLACEMENTS: dict[type[nn.Module], type[_GroupMixNorm]] = {
    nn.BatchNorm1d: GroupMixNorm1d,
    nn.BatchNorm2d: GroupMixNorm2d,
}
_TWO_D = (nn.Conv2d, nn.BatchNorm2d, GroupMixNorm2d)
_ONE_D = (nn.Linear, nn.Conv1d, nn.BatchNorm1d, GroupMixNorm1d)


def convert(
    model: nn.Module,
    *,
    layers: Selection = None,
    insert_after: Iterable[str] = (),
    num_groups: int | None = None,
    inplace: bool = False,
    **layer_options: Any,
) -> nn.Module:
    """Return ``model`` with GroupMixNorm layers.

    Every ``BatchNorm1d`` / ``BatchNorm2d`` chosen by ``layers`` becomes a ``GroupMixNorm1d`` /
    ``GroupMixNorm2d`` with the same ``eps``, ``momentum``, ``affine`` and ``track_running_stats``; its
    weight, bias, running statistics and batch count are copied, and the mixed running statistics are set
    so that the converted model in evaluation computes exactly what the original did. ``layers`` is
    ``None`` (every batch-norm layer), an iterable of module names, or a predicate ``(name, module) ->
    bool``; pass ``layers=()`` to replace none.

    Each module named in ``insert_after`` (a block, e.g. ``"layer2"``) is wrapped as
    ``nn.Sequential(block, GroupMixNorm)``, sized by the block's last convolution, linear or normalization
    layer. A freshly inserted layer is close to the identity in evaluation until it is trained.

    ``num_groups`` and ``layer_options`` (``mix``, ``alpha``, ``p``, ``eval_mode``, ``output_scale``,
    ``align_quantiles``, ...) go to every new layer. The model is copied first unless ``inplace``.
    In training the converted model needs the group ids: run it inside :func:`groupmixnorm.nn.use_groups`.

    Raises:
        ValueError: for a name in ``layers`` or ``insert_after`` that the model does not have, a named
            layer that is not batch normalization, or a block whose width cannot be inferred.
    """
    if not inplace:
        model = copy.deepcopy(model)
    insert_after = list(insert_after)
    modules = dict(model.named_modules())
    _check_names(modules, insert_after, "insert_after")
    for name in _selected_batch_norms(modules, layers):
        _set_module(model, name, _from_batch_norm(modules[name], num_groups, layer_options))
    for name in insert_after:
        block = model.get_submodule(name)
        layer = _layer_after(block, name, num_groups, layer_options)
        _set_module(model, name, nn.Sequential(block, layer))
    return model


def torchvision_model(name: str, *, convert_options: dict[str, Any] | None = None, **model_options: Any) -> nn.Module:
    """``torchvision.models.<name>(**model_options)`` passed through :func:`convert` (``convert_options``).

    Needs torchvision (``pip install "groupmixnorm[vision]"``); an ``ImportError`` says so when it is missing.
    """
    try:
        import torchvision
    except ImportError:
        raise ImportError(
            "torchvision is needed for torchvision models; install it with: pip install \"groupmixnorm[vision]\" "
            "(or build your own model and call groupmixnorm.nn.convert on it)"
        ) from None
    factory = getattr(torchvision.models, name, None)
    if factory is None:
        raise ValueError(f"torchvision.models has no model {name!r}")
    return convert(factory(**model_options), inplace=True, **(convert_options or {}))


@torch.no_grad()
def _from_batch_norm(
    norm: nn.modules.batchnorm._BatchNorm, num_groups: int | None, options: dict[str, Any]
) -> _GroupMixNorm:
    """A GroupMixNorm layer that, in evaluation, computes what ``norm`` does, with its training state."""
    reference = next(iter([*norm.parameters(), *norm.buffers()]), None)
    factory = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
    layer = _REPLACEMENTS[type(norm)](
        norm.num_features, num_groups=num_groups, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
        track_running_stats=norm.track_running_stats, **options, **factory,
    )
    if norm.affine:
        layer.weight.copy_(norm.weight)
        layer.bias.copy_(norm.bias)
    if norm.track_running_stats:
        layer.running_mean.copy_(norm.running_mean)
        layer.running_var.copy_(norm.running_var)
        layer.num_batches_tracked.copy_(norm.num_batches_tracked)
        # In evaluation the layer maps x to mix_std * (x - mean) / std + mix_mean, then to batch units
        # (x - mean) / std; with the mixed statistics equal to the population's, that is BatchNorm.
        layer.running_mix_mean.copy_(norm.running_mean)
        layer.running_mix_std.copy_(torch.sqrt(norm.running_var + norm.eps))
    layer.train(norm.training)
    return layer


def _selected_batch_norms(modules: dict[str, nn.Module], layers: Selection) -> list[str]:
    """Names of the batch-norm layers to replace, in model order."""
    candidates = [name for name, module in modules.items() if type(module) in _REPLACEMENTS]
    if layers is None:
        return candidates
    if callable(layers):
        return [name for name in candidates if layers(name, modules[name])]
    names = [layers] if isinstance(layers, str) else list(layers)
    _check_names(modules, names, "layers")
    wrong = [name for name in names if type(modules[name]) not in _REPLACEMENTS]
    if wrong:
        kinds = ", ".join(f"{name} ({type(modules[name]).__name__})" for name in wrong)
        raise ValueError(f"layers names modules that are not BatchNorm1d/BatchNorm2d: {kinds}")
    return [name for name in candidates if name in set(names)]


def _layer_after(block: nn.Module, name: str, num_groups: int | None, options: dict[str, Any]) -> _GroupMixNorm:
    """A GroupMixNorm layer sized for the output of ``block``, judged by its last sized submodule."""
    for module in reversed(list(block.modules())):
        if isinstance(module, _TWO_D):
            return GroupMixNorm2d(_width(module), num_groups=num_groups, **options)
        if isinstance(module, _ONE_D):
            return GroupMixNorm1d(_width(module), num_groups=num_groups, **options)
    raise ValueError(
        f"cannot tell the output width of {name!r} ({type(block).__name__}): it has no convolution, linear or "
        "normalization layer; add GroupMixNorm to the model by hand there"
    )


def _width(module: nn.Module) -> int:
    for attribute in ("out_channels", "out_features", "num_features"):
        if hasattr(module, attribute):
            return int(getattr(module, attribute))
    raise AssertionError(f"{type(module).__name__} has no width")  # _TWO_D and _ONE_D all have one


def _check_names(modules: dict[str, nn.Module], names: list[str], argument: str) -> None:
    unknown = [name for name in names if name not in modules or name == ""]
    if unknown:
        raise ValueError(f"{argument} names module(s) the model does not have: {', '.join(map(repr, unknown))}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
