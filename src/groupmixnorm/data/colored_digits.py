"""Colored digits: a bias benchmark built from scikit-learn's bundled handwritten digits (no download).

Construction (seeded by ``seed``):

- The 1,797 grayscale 8x8 digits of :func:`sklearn.datasets.load_digits` (pixel values 0..16, scaled to
  ``[0, 1]``) are split 60/20/20 into train, validation and test, stratified by digit.
- The label is ``y = 1`` for the digits 5..9 and ``y = 0`` for 0..4 (classes nearly balanced).
- The protected attribute is a color: each image ``g`` becomes a 3-channel image, ``g * (1, 0.2, 0.2)``
  ("red", group 1) or ``g * (0.2, 1, 0.2)`` ("green", group 0).
- In train and validation the color agrees with the label with probability ``bias``: a digit with
  ``y = 1`` is red with probability ``bias``, one with ``y = 0`` green with probability ``bias``. With
  the default 0.9 the color predicts the label 90 % of the time, and the phi correlation of color and
  label is about ``2 * bias - 1 = 0.8``: a shortcut a CNN finds long before the digits' shapes.
- In the test split every digit appears twice, once in each color, so that color is exactly independent of
  the label (and of the digit). A model that uses the color has a demographic-parity gap on test; one that
  reads the shape alone has none.

Every split is normalized per channel with the training images' mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from groupmixnorm.data.images import check_protocol, image_dataset
from groupmixnorm.data.tabular import TabularDataset

GROUP_NAMES = ["green", "red"]
#: RGB tint of each group, indexed by group id; a digit image is multiplied by it channel by channel.
TINTS = np.array([[0.2, 1.0, 0.2], [1.0, 0.2, 0.2]], dtype=np.float32)
SENSITIVE = "color"


def load_colored_digits(
    sensitive: str = SENSITIVE,
    protocol: str = "official",
    *,
    seed: int = 0,
    bias: float = 0.9,
) -> TabularDataset:
    """Load the colored-digits bias benchmark (see the module docstring for the construction).

    Parameters
    ----------
    sensitive : {"color"}
        The protected attribute; group ids follow :data:`GROUP_NAMES` (0 green, 1 red).
    protocol : {"official"}
        The construction above (the only one).
    seed : int
        Seed of the split and of the colors drawn for train and validation.
    bias : float
        Probability, in train and validation, that the color agrees with the label (red for 5..9); 0.5
        makes color independent of the label everywhere.

    Returns
    -------
    TabularDataset
        Float32 images of shape ``(n, 3, 8, 8)``, labels ``y = [digit >= 5]`` and color ids.
    """
    return biased_digits("colored-digits", colorize, sensitive=sensitive, attribute=SENSITIVE,
                         group_names=GROUP_NAMES, protocol=protocol, seed=seed, bias=bias)


def biased_digits(
    name: str,
    render: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    sensitive: str,
    attribute: str,
    group_names: list[str],
    protocol: str,
    seed: int,
    bias: float,
) -> TabularDataset:
    """A bias benchmark from the digits: ``render(gray, groups)`` draws each ``(n, 8, 8)`` digit in its
    group's way. In train and validation the group agrees with the label with probability ``bias``; in
    test every digit is drawn once in each group. ``sensitive`` must name ``attribute``, the only one."""
    if sensitive != attribute:
        raise ValueError(f"unknown sensitive attribute {sensitive!r} for {name}; it has only {attribute!r}")
    check_protocol(name, protocol)
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"bias must be a probability in [0, 1], got {bias!r}")
    gray, y, rows = split_digits(seed)
    rng = np.random.default_rng(seed)
    splits = {}
    for part in ("train", "val"):
        groups = biased_groups(y[rows[part]], bias, rng)
        splits[part] = render(gray[rows[part]], groups), y[rows[part]], groups
    test_gray, test_y = gray[rows["test"]], y[rows["test"]]
    both = np.repeat([0, 1], len(test_y))  # every digit once in each group: group independent of label and digit
    splits["test"] = render(np.concatenate([test_gray, test_gray]), both), np.concatenate([test_y, test_y]), both
    return image_dataset(name, splits, sensitive=attribute, group_names=list(group_names), protocol=protocol)


def split_digits(seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """scikit-learn's 8x8 digits in ``[0, 1]`` (float32 ``(n, 8, 8)``), the labels ``digit >= 5``, and the
    rows of a 60/20/20 train/validation/test split stratified by digit."""
    digits = load_digits()
    gray = (digits.images / 16.0).astype(np.float32)
    index = np.arange(len(gray))
    train, rest = train_test_split(index, test_size=0.4, stratify=digits.target, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=seed)
    return gray, (digits.target >= 5).astype(np.int64), {"train": train, "val": val, "test": test}


def biased_groups(y: np.ndarray, bias: float, rng: np.random.Generator) -> np.ndarray:
    """Group ids that agree with the label (group 1 for ``y = 1``) with probability ``bias``."""
    agrees = rng.random(len(y)) < bias
    return np.where(agrees, y, 1 - y)


def colorize(gray: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``(n, H, W)`` grayscale images tinted by group: ``(n, 3, H, W)`` float32."""
    return gray[:, None, :, :] * TINTS[groups][:, :, None, None]
