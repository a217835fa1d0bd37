"""Image datasets: colored digits (built here), CelebA from a fabricated folder in the official layout, a CNN
with GroupMixNorm2d trained through the loop and the command line, and the image bench."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from groupmixnorm import cli
from groupmixnorm.data import load_celeba, load_colored_digits, load_dataset
from groupmixnorm.experiments import RunSpec
from groupmixnorm.experiments import bench
from groupmixnorm.experiments.selection import validated_columns
from groupmixnorm.methods import make_method
from groupmixnorm.metrics import METRIC_NAMES
from groupmixnorm.nn import GroupMixNorm2d
from groupmixnorm.training import TrainConfig, train

# ------------------------------------------------------------------------------------------ colored digits


@pytest.fixture(scope="module")
def digits():
    return load_colored_digits(seed=0)


def test_colored_digits_shapes_labels_and_normalization(digits) -> None:
    assert digits.input_shape == (3, 8, 8) and digits.num_features == 192 and digits.group_names == ["green", "red"]
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1078, 359, 720)
    for split in (digits.train, digits.val, digits.test):
        assert split.X.dtype == np.float32 and split.X.shape == (len(split), 3, 8, 8)
        assert set(np.unique(split.y)) == {0, 1} and set(np.unique(split.a)) == {0, 1}
    np.testing.assert_allclose(digits.train.X.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(digits.train.X.std(axis=(0, 2, 3)), 1.0, atol=1e-4)


def test_color_follows_the_label_in_training_and_not_in_test(digits) -> None:
    for split in (digits.train, digits.val):
        assert (split.a == split.y).mean() == pytest.approx(0.9, abs=0.04)  # red goes with y = 1
    test = digits.test
    half = len(test) // 2
    assert (test.a == test.y).mean() == 0.5 and test.a[:half].sum() == 0 and test.a[half:].min() == 1
    np.testing.assert_array_equal(test.y[:half], test.y[half:])  # each digit once per color
    # The same digit in the other color: only the tint differs, so the red channel carries the difference.
    assert not np.allclose(test.X[0], test.X[half])


def test_colored_digits_are_seeded_and_bias_is_an_option() -> None:
    again, other = load_colored_digits(seed=0), load_colored_digits(seed=1)
    first = load_colored_digits(seed=0)
    np.testing.assert_array_equal(first.train.X, again.train.X)
    np.testing.assert_array_equal(first.train.a, again.train.a)
    assert not np.array_equal(first.train.a, other.train.a)
    unbiased = load_colored_digits(bias=0.5)
    assert (unbiased.train.a == unbiased.train.y).mean() == pytest.approx(0.5, abs=0.06)
    assert (load_colored_digits(bias=1.0).train.a == first.train.y).all()
    with pytest.raises(ValueError, match="bias"):
        load_colored_digits(bias=1.5)
    with pytest.raises(ValueError, match="color"):
        load_colored_digits(sensitive="sex")
    with pytest.raises(ValueError, match="official"):
        load_dataset("colored-digits", protocol="fairmixup")


def test_a_cnn_with_groupmixnorm2d_trains_and_predicts_without_the_attribute(digits) -> None:
    method = make_method("gmn", placement="all", align=0.0, align_quantiles=0)
    config = TrainConfig(epochs=3, iterations=20, batch_size=64, hidden=(8, 16), sampling="group", select="last",
                         lr=1e-2)
    result = train(method, digits, config)
    layers = [m for m in result.model.modules() if isinstance(m, GroupMixNorm2d)]
    assert len(layers) == 2 and all(int(layer.num_batches_tracked) == 60 for layer in layers)
    assert result.history[-1]["train_bce"] < result.history[0]["train_bce"]
    assert result.metrics["accuracy"] > 0.6 and result.metrics["ap"] > 0.7
    assert not method.uses_sensitive_at_prediction()


def test_train_colored_digits_from_the_command_line_writes_the_adult_metrics(tmp_path) -> None:
    argv = ["train", "--dataset", "colored-digits", "--method", "fairmixup", "--fairness", "eo", "--epochs", "2",
            "--iterations", "4", "--batch-size", "16", "--hidden", "4,8", "--quiet", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert all(0.0 <= record[key] <= 2.0 for key in METRIC_NAMES)
    assert record["dataset"]["name"] == "colored-digits" and record["dataset"]["sensitive"] == "color"
    assert set(record["group_rates"]) == {"green", "red"}
    assert "--dataset colored-digits --sensitive color" in record["command"]
    assert "--hidden 4,8" in record["command"]


def test_expgrad_fits_on_flattened_pixels(digits) -> None:
    result = train(make_method("expgrad", max_iter=5), digits, TrainConfig())
    assert result.model is None and result.metrics["accuracy"] > 0.6


# ------------------------------------------------------------------------------------------------ CelebA

ATTRIBUTES = ["5_o_Clock_Shadow", "Attractive", "Male", "Smiling", "Wavy_Hair", "Young"]
ROWS_PER_PARTITION = {0: 12, 1: 6, 2: 6}


def _fabricate_celeba(root) -> pd.DataFrame:
    """A CelebA folder in the official layout: 24 small JPEG faces, the attribute and partition files.

    Within every partition each (Smiling, Male) cell is present, so every metric is defined."""
    rng = np.random.default_rng(0)
    (root / "img_align_celeba").mkdir(parents=True)
    rows = []
    for partition, count in ROWS_PER_PARTITION.items():
        for index in range(count):
            name = f"{len(rows) + 1:06d}.jpg"
            smiling, male = (1 if index % 2 else -1), (1 if (index // 2) % 2 else -1)
            values = {attribute: int(rng.choice([-1, 1])) for attribute in ATTRIBUTES}
            values.update(Smiling=smiling, Male=male)
            pixels = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
            pixels[..., 0] = 200 if smiling > 0 else 40  # a learnable label
            Image.fromarray(pixels).save(root / "img_align_celeba" / name, quality=90)
            rows.append({"file": name, "partition": partition, **values})
    frame = pd.DataFrame(rows)
    lines = [str(len(frame)), " ".join(ATTRIBUTES)]
    lines += [f"{row['file']} " + " ".join(f"{row[a]:2d}" for a in ATTRIBUTES) for row in rows]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{row['file']} {row['partition']}\n" for row in rows))
    return frame


@pytest.fixture()
def celeba_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPMIXNORM_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "celeba"
    frame = _fabricate_celeba(root)
    return root, frame


def test_celeba_is_read_in_the_official_layout(celeba_dir, tmp_path) -> None:
    root, frame = celeba_dir
    data = load_celeba(data_dir=root, target="Attractive", sensitive="Male", image_size=16)
    assert data.input_shape == (3, 16, 16) and data.group_names == ["not Male", "Male"]
    for split, partition in ((data.train, 0), (data.val, 1), (data.test, 2)):
        rows = frame[frame["partition"] == partition]
        np.testing.assert_array_equal(split.y, (rows["Attractive"] > 0).astype(int))
        np.testing.assert_array_equal(split.a, (rows["Male"] > 0).astype(int))
    np.testing.assert_allclose(data.train.X.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    cached = list((tmp_path / "cache").glob("celeba-16px-*.npy"))
    assert len(cached) == 1
    (root / "img_align_celeba" / "000001.jpg").unlink()  # a second load needs only the cache
    again = load_celeba(data_dir=root, target="Attractive", image_size=16)
    np.testing.assert_array_equal(again.train.X, data.train.X)


def test_train_on_celeba_from_the_command_line(celeba_dir, tmp_path) -> None:
    root, _ = celeba_dir
    out = tmp_path / "run"
    argv = ["train", "--dataset", "celeba", "--data-dir", str(root), "--target", "Smiling", "--sensitive", "Male",
            "--method", "gmn", "--epochs", "2", "--hidden", "4,8", "--image-size", "16", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_NAMES) <= set(record)
    assert record["dataset"]["rows"] == {"train": 12, "val": 6, "test": 6}
    assert record["spec"]["dataset_options"] == {"data_dir": str(root), "image_size": 16, "target": "Smiling"}
    assert f"--data-dir {root}" in record["command"] and "--target Smiling" in record["command"]
    assert set(record["group_rates"]) == {"not Male", "Male"}


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_celeba_errors_name_the_missing_file_and_the_unknown_attribute(celeba_dir, capsys, tmp_path) -> None:
    root, _ = celeba_dir
    base = ["train", "--dataset", "celeba", "--method", "erm", "--quiet", "--out", str(tmp_path / "out")]
    err = _one_line_error(capsys, [*base, "--data-dir", str(root), "--target", "Smiley"])
    assert "unknown target 'Smiley'" in err and "Wavy_Hair" in err
    err = _one_line_error(capsys, [*base, "--data-dir", str(root), "--sensitive", "Female"])
    assert "unknown sensitive attribute 'Female'" in err
    assert "--data-dir" in _one_line_error(capsys, base)
    (root / "list_eval_partition.txt").unlink()
    assert "has no list_eval_partition.txt" in _one_line_error(capsys, [*base, "--data-dir", str(root)])


def test_data_flags_of_another_dataset_are_errors(capsys, tmp_path) -> None:
    out = ["--quiet", "--out", str(tmp_path)]
    assert "--target does not apply to --dataset adult" in _one_line_error(
        capsys, ["train", "--method", "erm", "--target", "Smiling", *out])
    assert "--image-size does not apply to --dataset colored-digits" in _one_line_error(
        capsys, ["train", "--dataset", "colored-digits", "--image-size", "32", *out])
    assert "--bias does not apply to --dataset adult" in _one_line_error(
        capsys, ["train", "--bias", "0.5", *out])


# ------------------------------------------------------------------------------------------------- bench


def test_quick_colored_digits_bench_writes_runs_csv_report_and_plots(tmp_path) -> None:
    assert cli.main(["bench", "colored-digits", "--quick", "--quiet", "--results-dir", str(tmp_path)]) == 0
    runs = pd.read_csv(tmp_path / "colored-digits" / "runs.csv")
    assert list(runs.columns) == validated_columns()
    assert set(runs["method"]) == {"erm", "gapreg", "adversarial", "fairmixup", "gmn", "expgrad"}
    assert runs["command"].str.startswith("groupmixnorm train --dataset colored-digits --sensitive color").all()
    report = (tmp_path / "colored-digits.md").read_text()
    assert "groupmixnorm bench colored-digits --quick" in report and "every digit appears once in each color" in report
    assert (tmp_path / "colored-digits" / "ap_vs_dp_gap_hard.png").read_bytes()[:4] == b"\x89PNG"


def test_celeba_bench_needs_a_folder(capsys) -> None:
    assert cli.main(["bench", "celeba", "--quick"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    plan = bench.celeba_plan(quick=True, data_dir="/data/celeba", target="Wavy_Hair")
    assert plan.name == "celeba-wavy_hair" and plan.specs()[0].dataset == "celeba"
    assert plan.specs()[0].dataset_options == {"data_dir": "/data/celeba", "target": "Wavy_Hair"}


def test_celeba_bench_on_the_fabricated_folder_writes_the_same_files(celeba_dir, tmp_path) -> None:
    import dataclasses

    root, _ = celeba_dir
    plan = bench.celeba_plan(quick=True, data_dir=str(root))
    plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, hidden=(4, 8), iterations=2),
                               dataset_options={**plan.dataset_options, "image_size": 16})
    records = bench.run_plan(plan, bench.RecordStore(tmp_path / "records"))
    written = bench.write_results(plan, records, tmp_path / "results", "groupmixnorm bench celeba --quick")
    assert {path.name for path in written} >= {"runs.csv", "ap_vs_dp_gap_hard.png", "ap_vs_dp_ks.png", "celeba-smiling.md"}
    runs = pd.read_csv(tmp_path / "results" / "celeba-smiling" / "runs.csv")
    assert list(runs.columns) == validated_columns() and len(runs) == len(plan.settings)
    assert runs["command"].str.contains(f"--data-dir {root} --image-size 16 --target Smiling").all()


def test_adult_run_specs_keep_their_keys() -> None:
    """Image options are added to a spec only when set, so the committed Adult records are still found."""
    record_file = sorted((bench.Path(__file__).parents[1] / "docs/results/adult/records").glob("erm-s0-*.json"))[0]
    spec = json.loads(record_file.read_text())["spec"]
    config = TrainConfig(**{**spec["config"], "hidden": tuple(spec["config"]["hidden"])})
    rebuilt = RunSpec(spec["method"], spec["method_options"], spec["dataset"], spec["sensitive"], spec["protocol"],
                      spec["quantize"], config)
    assert rebuilt.key() == record_file.stem


def test_readme_cnn_example_runs() -> None:
    import re

    text = (bench.Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    example = re.search(r"## Images\n.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["scores"].shape == (32, 1) and not namespace["cnn"].training
