"""CelebA from a local folder in the official layout (the data cannot be redistributed; see the README).

The folder holds::

    img_align_celeba/000001.jpg ... 202599.jpg   aligned and cropped faces, 178 x 218
    list_attr_celeba.txt                         a count line, a header of 40 attribute names, then one
                                                 line per image: file name and 40 values of -1 or 1
    list_eval_partition.txt                      one line per image: file name and 0 (train), 1 (val), 2 (test)

Images are center-cropped to a square, resized to ``image_size`` (bilinear, with antialiasing), and
normalized per channel with the training images' mean and standard deviation. Decoded images are cached
as uint8 arrays under ``$GROUPMIXNORM_CACHE_DIR`` (default ``~/.cache/groupmixnorm``), so only the first
load decodes the JPEG files. At 64 x 64 the whole set takes about 10 GB of memory as float32.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from groupmixnorm.data.images import check_protocol, image_dataset
from groupmixnorm.data.tabular import TabularDataset

IMAGE_FOLDER = "img_align_celeba"
ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
PARTITIONS = {"train": 0, "val": 1, "test": 2}


def load_celeba(
    sensitive: str = "Male",
    protocol: str = "official",
    *,
    data_dir: str | os.PathLike | None = None,
    target: str = "Smiling",
    image_size: int = 64,
    seed: int = 0,
) -> TabularDataset:
    """Load CelebA from ``data_dir`` with the label ``target`` and the protected attribute ``sensitive``.

    Both are attribute names of ``list_attr_celeba.txt`` (``Smiling``, ``Male``, ``Young``, ...); the value
    1 is the positive label, and group ids are 0 for -1 and 1 for 1 (named ``"not Male"`` and ``"Male"``).
    The official partition gives train (162,770 images), validation (19,867) and test (19,962); ``seed`` is
    accepted for a uniform interface and changes nothing.

    Raises
    ------
    ValueError
        Without ``data_dir``, for a missing file or image, a malformed line, an unknown attribute name, the
        same attribute as target and protected attribute, or an ``image_size`` below 4.
    """
    check_protocol("celeba", protocol)
    folder = checked_folder(data_dir)
    if image_size < 4:
        raise ValueError(f"image_size must be at least 4 pixels, got {image_size}")
    names, attributes = read_attributes(folder / ATTRIBUTE_FILE)
    for role, attribute in (("target", target), ("sensitive attribute", sensitive)):
        if attribute not in attributes:
            raise ValueError(f"unknown {role} {attribute!r} for celeba; {ATTRIBUTE_FILE} has: {', '.join(attributes)}")
    if target == sensitive:
        raise ValueError(f"the target and the protected attribute are both {target!r}")
    partition = read_partition(folder / PARTITION_FILE, names)
    images = decoded_images(folder, names, image_size)
    y = (attributes[target] > 0).astype(np.int64)
    a = (attributes[sensitive] > 0).astype(np.int64)
    splits = {part: (images[partition == value], y[partition == value], a[partition == value])
              for part, value in PARTITIONS.items()}
    return image_dataset("celeba", splits, sensitive=sensitive, group_names=[f"not {sensitive}", sensitive],
                         protocol=protocol, scale=1.0 / 255.0)


def checked_folder(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` as a path, once it holds the files of the official release; ``ValueError`` naming what is
    missing."""
    if data_dir is None:
        raise ValueError(f"celeba is read from a local folder: pass data_dir, the folder holding {IMAGE_FOLDER}/, "
                         f"{ATTRIBUTE_FILE} and {PARTITION_FILE} (see the README for how to obtain CelebA)")
    folder = Path(data_dir)
    for name in (IMAGE_FOLDER, ATTRIBUTE_FILE, PARTITION_FILE):
        if not (folder / name).exists():
            raise ValueError(f"the CelebA folder {folder} has no {name} (expected {IMAGE_FOLDER}/, {ATTRIBUTE_FILE} "
                             f"and {PARTITION_FILE}, as in the official release)")
    return folder


def read_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The image file names and, per attribute name, the int8 column of -1 / 1 values."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < 3:
        raise ValueError(f"{path} has no attribute rows (expected a count line, a header line, then rows)")
    header = lines[1].split()
    rows = [line.split() for line in lines[2:]]
    for number, row in enumerate(rows, start=3):
        if len(row) != len(header) + 1:
            raise ValueError(f"{path} line {number} has {len(row) - 1} values for {len(header)} attributes")
    try:
        values = np.array([row[1:] for row in rows], dtype=np.int8)
    except ValueError:
        raise ValueError(f"{path} has attribute values that are not -1 or 1") from None
    return [row[0] for row in rows], {name: values[:, column] for column, name in enumerate(header)}


def read_partition(path: Path, names: list[str]) -> np.ndarray:
    """The official partition (0 train, 1 validation, 2 test) of each image in ``names``."""
    lookup = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"{path} line {number} is not 'FILE 0|1|2': {line!r}")
        lookup[parts[0]] = int(parts[1])
    missing = [name for name in names if name not in lookup]
    if missing:
        raise ValueError(f"{path} has no partition for {len(missing)} image(s), e.g. {missing[0]}")
    return np.array([lookup[name] for name in names], dtype=np.int64)


def decoded_images(folder: Path, names: list[str], size: int) -> np.ndarray:
    """The images ``names`` of ``folder/img_align_celeba`` as uint8 ``(n, 3, size, size)``, from the cache
    when an earlier call decoded the same files at the same size."""
    cache = _cache_path(folder, names, size)
    if cache.exists():
        return np.load(cache)
    images = np.stack([_decode(folder / IMAGE_FOLDER / name, size) for name in names])
    _save_atomic(cache, images)
    return images


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise ValueError(f"missing CelebA image {path}")
    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def _cache_path(folder: Path, names: list[str], size: int) -> Path:
    root = Path(os.environ.get("GROUPMIXNORM_CACHE_DIR", Path.home() / ".cache" / "groupmixnorm"))
    key = hashlib.sha256("\n".join([str(folder.resolve()), str(size), *names]).encode()).hexdigest()[:16]
    return root / f"celeba-{size}px-{key}.npy"


def _save_atomic(path: Path, images: np.ndarray) -> None:
    """Write the cache via a temporary file and a rename; an unwritable cache only costs decoding again."""
    from groupmixnorm.files import atomic_output

    try:
        with atomic_output(path) as temporary, open(temporary, "wb") as stream:
            np.save(stream, images)
    except OSError:
        return
