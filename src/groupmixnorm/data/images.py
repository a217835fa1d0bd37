"""What the image datasets share: per-channel normalization and packing images into a dataset."""

from __future__ import annotations

import numpy as np

from groupmixnorm.data.tabular import Split, TabularDataset

#: Image datasets come with their own splits.
IMAGE_PROTOCOLS = ("official",)


def channel_statistics(images: np.ndarray, scale: float = 1.0, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of ``(n, C, H, W)`` images times ``scale``, as float32
    ``(C,)`` arrays; summed in chunks so that a large uint8 set is never held in float64 at once."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for start in range(0, len(images), chunk):
        values = images[start:start + chunk].astype(np.float64) * scale
        total += values.sum(axis=(0, 2, 3))
        squares += np.square(values).sum(axis=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def normalized(images: np.ndarray, mean: np.ndarray, std: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``(images * scale - mean) / std`` per channel, float32 (``scale`` turns uint8 into ``[0, 1]``)."""
    out = images.astype(np.float32)
    if scale != 1.0:
        out *= np.float32(scale)
    out -= mean.reshape(1, -1, 1, 1)
    out /= std.reshape(1, -1, 1, 1)
    return out


def image_dataset(
    name: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    sensitive: str,
    group_names: list[str],
    protocol: str,
    scale: float = 1.0,
) -> TabularDataset:
    """Pack ``{"train"|"val"|"test": (images, y, a)}`` into a dataset, every split normalized per channel
    with the training images' mean and standard deviation."""
    mean, std = channel_statistics(splits["train"][0], scale)
    packed = {
        part: Split(X=normalized(images, mean, std, scale), y=y.astype(np.int64), a=a.astype(np.int64))
        for part, (images, y, a) in splits.items()
    }
    return TabularDataset(
        name=name, train=packed["train"], val=packed["val"], test=packed["test"], feature_names=[],
        sensitive=sensitive, group_names=group_names, protocol=protocol, preprocessor=None,
    )


def check_protocol(dataset: str, protocol: str) -> None:
    if protocol not in IMAGE_PROTOCOLS:
        raise ValueError(f"{dataset} has only the {' and '.join(IMAGE_PROTOCOLS)} protocol, got {protocol!r}")
