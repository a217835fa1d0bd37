"""Textured digits: the group is the orientation of background stripes, invisible to channel statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from groupmixnorm import cli
from groupmixnorm.data import load_colored_digits, load_dataset, load_textured_digits
from groupmixnorm.data.textured_digits import PERIOD, SIZE, stripe_images, texture


@pytest.fixture(scope="module")
def textured():
    return load_textured_digits(seed=0)


def test_shapes_labels_groups_and_normalization(textured) -> None:
    assert textured.train.X.shape[1:] == (1, SIZE, SIZE) and textured.train.X.dtype == np.float32
    assert textured.group_names == ["horizontal", "vertical"] and textured.sensitive == "texture"
    assert abs(float(textured.train.X.mean())) < 1e-4 and float(textured.train.X.std()) == pytest.approx(1.0, abs=1e-3)
    # The split, labels and group draws of train and validation are colored digits' for the same seed.
    colored = load_colored_digits(seed=0)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(textured, part).y, getattr(colored, part).y)
        np.testing.assert_array_equal(getattr(textured, part).a, getattr(colored, part).a)


def test_texture_follows_the_label_in_training_and_not_in_test(textured) -> None:
    train, test = textured.train, textured.test
    agreement = float((train.a == train.y).mean())
    # 1,078 draws of probability 0.9: five standard deviations are 0.046.
    assert abs(agreement - 0.9) < 5 * np.sqrt(0.9 * 0.1 / len(train.y))
    half = len(test.y) // 2
    np.testing.assert_array_equal(test.a, np.repeat([0, 1], half))
    np.testing.assert_array_equal(test.y[:half], test.y[half:])


def test_the_two_textures_differ_in_orientation_alone() -> None:
    phases = np.arange(PERIOD)
    horizontal = stripe_images(np.zeros(PERIOD, dtype=int), phases)
    vertical = stripe_images(np.ones(PERIOD, dtype=int), phases)
    np.testing.assert_array_equal(vertical, horizontal.transpose(0, 2, 1))
    assert np.ptp(horizontal, axis=2).max() == 0 and np.ptp(vertical, axis=1).max() == 0  # rows, then columns
    # Over the phases of one period every pixel's average is the same: the texture is uncorrelated with any
    # digit, so the images' mean and variance averaged over the phases do not depend on the orientation.
    np.testing.assert_allclose(horizontal.mean(axis=0), 0.5, atol=1e-12)
    digit = np.random.default_rng(0).random((1, 8, 8))
    moments = []
    for group in (0, 1):
        images = [texture(digit, np.array([group]), _fixed_style(phase))[0, 0] for phase in phases]
        moments.append((np.mean([i.mean() for i in images]), np.mean([i.var() for i in images])))
    np.testing.assert_allclose(moments[0], moments[1], rtol=1e-6)


class _fixed_style:
    """A stand-in generator: the given phase, contrast 1 and brightness 0."""

    def __init__(self, phase: int) -> None:
        self.phase = phase

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        return np.full(size, self.phase)

    def uniform(self, low: float, high: float, size: tuple[int, ...]) -> np.ndarray:
        return np.full(size, (low + high) / 2) if low < 0 else np.ones(size)


def test_textured_digits_are_seeded_and_refuse_bad_options() -> None:
    np.testing.assert_array_equal(load_dataset("textured-digits", seed=1).train.X, load_textured_digits(seed=1).train.X)
    assert not np.array_equal(load_textured_digits(seed=1).train.X, load_textured_digits(seed=2).train.X)
    with pytest.raises(ValueError, match="bias must be a probability"):
        load_textured_digits(bias=1.5)
    with pytest.raises(ValueError, match="unknown sensitive attribute 'color' for textured-digits"):
        load_textured_digits(sensitive="color")


def test_train_textured_digits_from_the_command_line(tmp_path) -> None:
    out = tmp_path / "run"
    code = cli.main(["train", "--dataset", "textured-digits", "--method", "gmn", "--placement", "all", "--align", "0",
                     "--epochs", "1", "--iterations", "2", "--batch-size", "16", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["name"] == "textured-digits" and metrics["dataset"]["sensitive"] == "texture"
    assert 0.0 <= metrics["ap"] <= 1.0
