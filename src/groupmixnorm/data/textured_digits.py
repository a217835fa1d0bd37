"""Textured digits: a bias benchmark where the group is a spatial pattern, not a shift of channel statistics.

Colored digits tint each group differently, which moves the channels' means: exactly the statistics that
GroupMixNorm mixes. Here the two groups' images have the same distribution of pixel values; they differ
only in the *orientation* of a background texture, which per-channel means and variances cannot see.

Construction (seeded by ``seed``; the split, labels and group draws are those of colored digits):

- scikit-learn's 8x8 digits in ``[0, 1]``, split 60/20/20 stratified by digit; the label is ``digit >= 5``.
- Each digit is upsampled 3x (bilinear) to 24x24 and laid over stripes of period 4 pixels with a random
  phase: horizontal stripes for group 0, vertical ones for group 1. Turning the stripes a quarter turn
  permutes their pixels, and with a random phase they are uncorrelated with the digit on average, so the
  two groups' images have the same mean and variance: the channel statistics cannot tell them apart.
- A per-image style shift, drawn alike for both groups: contrast in ``[0.6, 1.4]`` and brightness in
  ``[-0.2, 0.2]``: the nuisance that normalization layers are meant to remove.
- In train and validation the texture agrees with the label (vertical for 5..9) with probability ``bias``;
  in test every digit appears twice, once with each texture, so texture is independent of the label.

One gray channel, normalized with the training images' mean and standard deviation.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import zoom

from groupmixnorm.data.colored_digits import biased_digits
from groupmixnorm.data.tabular import TabularDataset

GROUP_NAMES = ["horizontal", "vertical"]
SENSITIVE = "texture"
#: Side of the images (3x the digits' 8 pixels) and period of the stripes, which divides it.
SIZE, PERIOD = 24, 4
#: Share of the digit and of the texture in each image, before the style shift.
DIGIT_WEIGHT, TEXTURE_WEIGHT = 0.7, 0.3


def load_textured_digits(
    sensitive: str = SENSITIVE,
    protocol: str = "official",
    *,
    seed: int = 0,
    bias: float = 0.9,
) -> TabularDataset:
    """Load the textured-digits bias benchmark (see the module docstring for the construction).

    Parameters
    ----------
    sensitive : {"texture"}
        The protected attribute; group ids follow :data:`GROUP_NAMES` (0 horizontal, 1 vertical).
    protocol : {"official"}
        The construction above (the only one).
    seed : int
        Seed of the split, of the textures drawn for train and validation, and of the style shifts.
    bias : float
        Probability, in train and validation, that the texture agrees with the label.

    Returns
    -------
    TabularDataset
        Float32 images of shape ``(n, 1, 24, 24)``, labels ``y = [digit >= 5]`` and texture ids.
    """
    style = np.random.default_rng([seed, 1])  # apart from the group draws, which stay colored digits'
    return biased_digits("textured-digits", lambda gray, groups: texture(gray, groups, style), sensitive=sensitive,
                         attribute=SENSITIVE, group_names=GROUP_NAMES, protocol=protocol, seed=seed, bias=bias)


def texture(gray: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(n, 8, 8)`` digits in ``[0, 1]`` over each group's stripes, with a random style per image:
    float32 ``(n, 1, 24, 24)``."""
    digits = np.clip(zoom(gray, (1, SIZE / gray.shape[1], SIZE / gray.shape[2]), order=1), 0.0, 1.0)
    stripes = stripe_images(groups, rng.integers(0, PERIOD, len(groups)))
    contrast = rng.uniform(0.6, 1.4, (len(groups), 1, 1))
    brightness = rng.uniform(-0.2, 0.2, (len(groups), 1, 1))
    images = contrast * (DIGIT_WEIGHT * digits + TEXTURE_WEIGHT * stripes) + brightness
    return images[:, None].astype(np.float32)


def stripe_images(groups: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """``(n, SIZE, SIZE)`` stripes in ``[0, 1]``: along the rows for group 0, along the columns for group 1,
    shifted by ``phases`` pixels."""
    coordinate = np.arange(SIZE)
    wave = 0.5 * (1 + np.cos(2 * np.pi * (coordinate[None, :] + phases[:, None]) / PERIOD))  # (n, SIZE)
    horizontal = np.repeat(wave[:, :, None], SIZE, axis=2)  # constant along each row
    return np.where(groups[:, None, None] == 0, horizontal, horizontal.transpose(0, 2, 1))
