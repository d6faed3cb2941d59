"""Bad data named before training: the folder scan, its cache, the shared class map, the unlabeled dataset,
and the DataModule around them (sslpipe.data.scan, sslpipe.data.datasets, sslpipe.data.datamodule)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sslpipe.data.datamodule as datamodule_module
from sslpipe.augment import eval_transform
from sslpipe.cli import user_message
from sslpipe.data import SSLDataModule, build_dataset
from sslpipe.data.scan import scan_folder
from sslpipe.errors import ConfigError, DataError, DataNotFoundError

SIZE = 16


@pytest.fixture(autouse=True)
def scan_cache(tmp_path, monkeypatch) -> str:
    """Each test its own scan cache (never the user's ~/.cache)."""
    path = str(tmp_path / "scan-cache")
    monkeypatch.setenv("SSLPIPE_CACHE_DIR", path)
    return path


# ------------------------------------------------------------------ writing tiny folders
def write_image(path: str, seed: int, size: int = 20, fmt: str = "JPEG") -> str:
    """A random RGB image at ``path`` (parents created)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)
    return path


def write_classes(split_dir: str, classes: dict[str, int], seed: int = 0, prefix: str = "") -> list[str]:
    """``count`` JPEGs (``<prefix><i>.jpg``) per class folder of ``split_dir``; returns their paths."""
    paths = []
    for c, count in classes.items():
        os.makedirs(os.path.join(split_dir, c), exist_ok=True)
        for i in range(count):
            paths.append(write_image(os.path.join(split_dir, c, f"{prefix}{i}.jpg"), seed))
            seed += 1
    return paths


def truncate(path: str, keep: float = 0.6) -> str:
    """Cut the file at ``path`` to a fraction of its size (a download interrupted half-way)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return path


def add_bad_files(split_dir: str) -> dict[str, str]:
    """One of each kind of bad file, and an empty class folder; returns {kind: path}."""
    bad = {
        "truncated": truncate(write_image(os.path.join(split_dir, "cat", "truncated.jpg"), 99, size=64)),
        "zero_byte": os.path.join(split_dir, "dog", "zero.jpg"),
        "text": os.path.join(split_dir, "eel", "notes.png"),
    }
    open(bad["zero_byte"], "wb").close()
    with open(bad["text"], "w") as f:
        f.write("this is not a PNG")
    os.makedirs(os.path.join(split_dir, "fox"))
    with open(os.path.join(split_dir, "fox", "README.txt"), "w") as f:
        f.write("no images here")  # not an image extension: ignored, so the class is empty
    return bad


def bad_folder(root: str, val_bad: bool = False) -> dict[str, str]:
    """An ImageNet-style folder with good images and every kind of bad file in train (and one in val)."""
    write_classes(os.path.join(root, "train"), {"cat": 4, "dog": 4, "eel": 4})
    write_classes(os.path.join(root, "val"), {"cat": 2, "dog": 2, "eel": 2}, seed=100)
    bad = add_bad_files(os.path.join(root, "train"))
    if val_bad:
        bad["val_truncated"] = truncate(write_image(os.path.join(root, "val", "dog", "cut.jpg"), 7, size=64))
    return bad


def write_unlabeled(root: str) -> list[str]:
    """A nested folder mixing formats and extension case, plus files that are not images."""
    names = ["a.JPG", "b.jpeg", "sub/c.png", "sub/deep/d.WebP", "e.gif", "sub/f.BMP", "g.tiff", "sub/deep/h.Tif"]
    formats = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}
    paths = []
    for i, name in enumerate(names):
        ext = name.rsplit(".", 1)[1].lower()
        paths.append(write_image(os.path.join(root, name), i, fmt=formats.get(ext, "TIFF")))
    with open(os.path.join(root, "sub", "notes.txt"), "w") as f:
        f.write("not an image")
    with open(os.path.join(root, "._a.JPG"), "wb") as f:
        f.write(b"\x00\x05\x16\x07 macOS resource fork")  # hidden: skipped, not reported
    return paths


# ------------------------------------------------------------------ bad files
def test_every_bad_file_named_in_one_error(tmp_path):
    bad = bad_folder(str(tmp_path / "ds"))
    with pytest.raises(DataError) as err:
        build_dataset("imagefolder", str(tmp_path / "ds"), "train")
    message = str(err.value)
    for path in bad.values():
        assert os.path.abspath(path) in message
    assert "image file is truncated" in message and "empty file (0 bytes)" in message
    assert "not an image PIL can read" in message
    assert "class folders with no readable image" in message and "fox" in message
    assert "3 of 15 image files" in message  # 12 good + 3 bad; README.txt is not an image file
    assert "--data.on_bad_image skip" in message


def test_skip_drops_bad_files_and_logs_the_count(tmp_path, caplog):
    bad = bad_folder(str(tmp_path / "ds"))
    with caplog.at_level(logging.WARNING, logger="sslpipe"):
        train = build_dataset("imagefolder", str(tmp_path / "ds"), "train", on_bad_image="skip")
    assert len(train) == 12
    paths = {p for p, _ in train.samples}
    assert not paths & {os.path.abspath(p) for p in bad.values()} and not paths & set(bad.values())
    assert train.classes == ["cat", "dog", "eel", "fox"]  # the empty class keeps its index...
    assert 3 not in train.targets  # ...and has no images
    assert "skipping 3 unreadable image file(s) of 15" in caplog.text
    assert "fox" in caplog.text
    for i in range(len(train)):
        assert train[i][0].mode == "RGB"


def test_many_bad_files_listed_up_to_a_limit(tmp_path):
    split = str(tmp_path / "ds" / "train")
    write_classes(split, {"a": 2})
    for i in range(25):
        open(os.path.join(split, "a", f"empty{i:02d}.jpg"), "wb").close()
    with pytest.raises(DataError) as err:
        build_dataset("imagefolder", str(tmp_path / "ds"), "train")
    message = str(err.value)
    assert "25 of 27" in message and "... and 5 more" in message
    assert message.count("empty file (0 bytes)") == 20


def test_nothing_usable(tmp_path):
    with pytest.raises(DataNotFoundError, match="--data.root"):
        build_dataset("imagefolder", str(tmp_path / "missing"), "train")
    os.makedirs(tmp_path / "noclasses" / "train")
    with pytest.raises(DataError, match="no class sub-folders"):
        build_dataset("imagefolder", str(tmp_path / "noclasses"), "train")
    os.makedirs(tmp_path / "empty" / "train" / "a")
    with pytest.raises(DataError, match="no image files"):
        build_dataset("imagefolder", str(tmp_path / "empty"), "train", on_bad_image="skip")
    split = str(tmp_path / "allbad" / "train" / "a")
    os.makedirs(split)
    open(os.path.join(split, "x.jpg"), "wb").close()
    with pytest.raises(DataError, match="none of the 1 image files"):
        build_dataset("imagefolder", str(tmp_path / "allbad"), "train", on_bad_image="skip")
    with pytest.raises(ConfigError, match="on_bad_image"):
        SSLDataModule("imagefolder", root=str(tmp_path), on_bad_image="ignore")


def test_skip_applies_to_val(tmp_path):
    root = str(tmp_path / "ds")
    bad = bad_folder(root, val_bad=True)
    dm = SSLDataModule("imagefolder", root=root, image_size=SIZE, batch_size=4, num_workers=0, on_bad_image="skip")
    dm.setup("fit")
    val = dm.split_dataset("val")
    assert len(val) == 6 and os.path.abspath(bad["val_truncated"]) not in {os.path.abspath(p) for p, _ in val.samples}
    assert sum(len(y) for _, y in dm.val_dataloader()) == 6
    strict = SSLDataModule("imagefolder", root=root, image_size=SIZE, batch_size=4, num_workers=0)
    with pytest.raises(DataError, match="cut.jpg"):
        strict.eval_dataloader("val")


# ------------------------------------------------------------------ one class map for train and val
def test_val_labels_use_train_class_indices(tmp_path, caplog):
    root = tmp_path / "ds"
    write_classes(str(root / "train"), {"a": 2, "b": 2, "c": 2})
    write_classes(str(root / "val"), {"a": 1, "c": 2}, seed=50)  # no val/b
    train = build_dataset("imagefolder", str(root), "train")
    with caplog.at_level(logging.WARNING, logger="sslpipe"):
        val = build_dataset("imagefolder", str(root), "val")
    assert train.classes == val.classes == ["a", "b", "c"]
    c_index = train.classes.index("c")
    assert c_index == 2
    for path, label in val.samples:
        folder = os.path.basename(os.path.dirname(path))
        assert label == (c_index if folder == "c" else 0)  # indexed on its own, val/c would get label 1
    assert [label for _, label in val.samples] == [0, 2, 2]
    assert "have no folder in" in caplog.text and "(b)" in caplog.text


def test_val_class_unknown_to_train_is_an_error(tmp_path):
    root = tmp_path / "ds"
    write_classes(str(root / "train"), {"a": 2, "b": 2})
    write_classes(str(root / "val"), {"a": 1, "b": 1, "zebra": 1}, seed=50)
    with pytest.raises(DataError) as err:
        build_dataset("imagefolder", str(root), "val")
    message = str(err.value)
    assert "'zebra'" in message and str(root / "val") in message and str(root / "train") in message
    build_dataset("imagefolder", str(root), "train")  # train alone is fine


# ------------------------------------------------------------------ the scan cache
@pytest.fixture
def count_opens(monkeypatch):
    """Every path PIL opens (the loader and the check open files through Image.open)."""
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(getattr(fp, "name", fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def test_unchanged_folder_is_not_reopened(tmp_path, count_opens, scan_cache):
    root = tmp_path / "ds"
    paths = write_classes(str(root / "train"), {"a": 3, "b": 3})
    before = sorted(os.listdir(root / "train" / "a")) + sorted(os.listdir(root / "train" / "b"))
    first = scan_folder(str(root / "train"), ["a", "b"])
    assert sorted(count_opens) == sorted(paths) and first.problems == {}
    count_opens.clear()
    second = scan_folder(str(root / "train"), ["a", "b"])
    assert count_opens == [] and second.files == first.files
    # the index lives in the cache folder, never in the data folder
    assert sorted(os.listdir(root / "train" / "a")) + sorted(os.listdir(root / "train" / "b")) == before
    assert os.listdir(root) == ["train"] and os.listdir(os.path.join(scan_cache, "scans"))


def test_changed_files_are_rechecked(tmp_path, count_opens):
    root = tmp_path / "ds"
    paths = write_classes(str(root / "train"), {"a": 3, "b": 3})
    build_dataset("imagefolder", str(root), "train")
    count_opens.clear()
    truncate(paths[1])  # size changes
    with pytest.raises(DataError, match="1 of 6"):
        build_dataset("imagefolder", str(root), "train")
    assert count_opens == [paths[1]]
    count_opens.clear()
    stat = os.stat(paths[4])
    with open(paths[4], "rb") as f:
        same_bytes = f.read()
    with open(paths[4], "wb") as f:  # rewritten: same size, only the mtime tells
        f.write(same_bytes)
    os.utime(paths[4], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    os.remove(paths[5])
    write_image(str(root / "train" / "b" / "new.png"), seed=5, fmt="PNG")
    scan = scan_folder(str(root / "train"), ["a", "b"])
    assert sorted(count_opens) == sorted([paths[4], str(root / "train" / "b" / "new.png")])
    assert list(scan.problems) == [os.path.join("a", "1.jpg")]  # the truncated one is still remembered as bad
    assert len(scan.files) == 6


def test_unwritable_cache_still_scans(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be created under a file")
    monkeypatch.setenv("SSLPIPE_CACHE_DIR", str(blocker))
    write_classes(str(tmp_path / "ds" / "train"), {"a": 2})
    with caplog.at_level(logging.WARNING, logger="sslpipe"):
        assert len(build_dataset("imagefolder", str(tmp_path / "ds"), "train")) == 2
    assert "cannot write the scan cache" in caplog.text


# ------------------------------------------------------------------ a file that goes bad after the scan
def test_file_broken_after_the_scan(tmp_path, caplog):
    root = tmp_path / "ds"
    paths = write_classes(str(root / "train"), {"a": 2, "b": 2})
    strict = build_dataset("imagefolder", str(root), "train")
    skipping = build_dataset("imagefolder", str(root), "train", on_bad_image="skip")
    expected_next = np.asarray(skipping[2][0])
    truncate(paths[1])
    with pytest.raises(DataError) as err:
        strict[1]
    assert paths[1] in str(err.value) and "changed since" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="sslpipe"):
        image, label = skipping[1]  # replaced by the next image in the list, with its label
    np.testing.assert_array_equal(np.asarray(image), expected_next)
    assert label == 1 and paths[1] in caplog.text


def test_worker_error_message_without_worker_traceback(tmp_path):
    root = tmp_path / "ds"
    paths = write_classes(str(root / "train"), {"a": 2})
    dataset = build_dataset("imagefolder", str(root), "train")
    truncate(paths[0])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=list)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)  # how DataLoader re-raises a worker's error
    message = user_message(err.value)
    assert message.startswith(f"cannot read {paths[0]}") and "Traceback" not in message


# ------------------------------------------------------------------ unlabeled folders
def test_unlabeled_nested_mixed_formats(tmp_path):
    root = str(tmp_path / "pile")
    paths = write_unlabeled(root)
    dataset = build_dataset("unlabeled", root, "pretrain", eval_transform(SIZE, (0.5,) * 3, (0.2,) * 3))
    assert sorted(p for p, _ in dataset.samples) == sorted(paths)
    assert dataset.targets == [-1] * len(paths)
    for x, y in dataset:
        assert x.shape == (3, SIZE, SIZE) and y == -1
    with pytest.raises(DataError, match="--data.eval_root"):
        build_dataset("unlabeled", root, "val")
    with pytest.raises(DataNotFoundError, match="--data.root"):
        build_dataset("unlabeled", str(tmp_path / "nowhere"), "pretrain")
    os.makedirs(tmp_path / "void" / "sub")
    with pytest.raises(DataError, match="no image files"):
        build_dataset("unlabeled", str(tmp_path / "void"), "pretrain")


def test_unlabeled_bad_files(tmp_path):
    root = str(tmp_path / "pile")
    write_unlabeled(root)
    cut = truncate(write_image(os.path.join(root, "sub", "cut.jpg"), 3, size=64))
    with pytest.raises(DataError, match="cut.jpg"):
        build_dataset("unlabeled", root, "pretrain")
    assert len(build_dataset("unlabeled", root, "pretrain", on_bad_image="skip")) == 8
    assert os.path.exists(cut)


def test_datamodule_unlabeled(tmp_path):
    root = str(tmp_path / "pile")
    write_unlabeled(root)
    dm = SSLDataModule("unlabeled", root=root, image_size=SIZE, batch_size=4, num_workers=0)
    assert dm.num_classes == 0 and dm.pretrain_num_classes == 0
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_train_samples == 8 and dm.val_dataloader() == []
    views, labels, indices = next(iter(dm.train_dataloader()))
    assert views[0].shape == (4, 3, SIZE, SIZE) and (labels == -1).all()
    preview = dm.preview_dataset()  # for reconstructions: pretraining images with the eval transform
    assert preview[0][0].shape == (3, SIZE, SIZE)
    with pytest.raises(DataError, match="--data.eval_root"):
        dm.eval_dataloader("train")


def test_datamodule_unlabeled_with_eval_root(tmp_path):
    root, labelled = str(tmp_path / "pile"), tmp_path / "labelled"
    write_unlabeled(root)
    write_classes(str(labelled / "train"), {"x": 2, "y": 2, "z": 1})
    write_classes(str(labelled / "val"), {"x": 1, "z": 1}, seed=30)
    dm = SSLDataModule("unlabeled", root=root, eval_root=str(labelled), image_size=SIZE, batch_size=4, num_workers=0)
    assert dm.num_classes == 3 and dm.pretrain_num_classes == 0  # no probe: the pretraining images have no labels
    assert dm.labelled_root == str(labelled)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    images, labels = next(iter(dm.eval_dataloader("val")))
    assert images.shape == (2, 3, SIZE, SIZE) and labels.tolist() == [0, 2]
    assert sum(len(y) for _, y in dm.eval_dataloader("train")) == 5
    with pytest.raises(ConfigError, match="eval_root"):
        SSLDataModule("imagefolder", root=str(labelled), eval_root=str(labelled))


# ------------------------------------------------------------------ the DataModule builds each split once
def test_datamodule_builds_pretraining_set_once(tmp_path, monkeypatch):
    root = str(tmp_path / "ds")
    write_classes(os.path.join(root, "train"), {"a": 4, "b": 4})
    write_classes(os.path.join(root, "val"), {"a": 1, "b": 1}, seed=9)
    builds: list[str] = []
    real_build = datamodule_module.build_dataset

    def counting_build(name, root, split, *args, **kwargs):
        builds.append(split)
        return real_build(name, root, split, *args, **kwargs)

    monkeypatch.setattr(datamodule_module, "build_dataset", counting_build)
    dm = SSLDataModule("imagefolder", root=root, image_size=SIZE, batch_size=4, num_workers=0)
    _ = dm.num_train_samples  # PIRL reads this before or after setup
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_train_samples == 8
    dm.train_dataloader()
    dm.val_dataloader()
    dm.eval_dataloader("val")
    assert builds == ["pretrain", "val"]
