"""Datasets by name (digits, fake, imagefolder, torchvision ones) and the shared DataModule."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from sslpipe.augment import SimCLRViews, eval_transform
from sslpipe.data import DATASETS, SSLDataModule, build_dataset, dataset_spec

SIZE = 16


def _image(mode: str, seed: int, size: tuple[int, int] = (20, 14)) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")
    return rgb.convert(mode)


def write_image_folder(root, classes=("cat", "dog", "eel"), per_class_train=3, per_class_val=1) -> str:
    """An ImageNet-style folder whose files mix grayscale JPEG, RGBA PNG and CMYK JPEG."""
    kinds = [("L", "jpg"), ("RGBA", "png"), ("CMYK", "jpg"), ("P", "png")]
    seed = 0
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(count):
                mode, ext = kinds[seed % len(kinds)]
                _image(mode, seed).save(os.path.join(root, split, c, f"{i}.{ext}"))
                seed += 1
    with open(os.path.join(root, "train", "README.txt"), "w") as f:
        f.write("a stray file is not a class")
    return str(root)


# ------------------------------------------------------------------ datasets by name
def test_digits_splits():
    train = build_dataset("digits", "unused", "pretrain")
    labelled = build_dataset("digits", "unused", "train")
    val = build_dataset("digits", "unused", "val")
    assert len(train) == len(labelled) == 1437 and len(val) == 360
    image, label = val[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    assert isinstance(label, int)
    assert sorted(set(int(t) for t in train.targets)) == list(range(10))
    assert sorted(set(int(t) for t in val.targets)) == list(range(10))
    assert dataset_spec("digits").num_classes == 10
    # the split is fixed: a second build gives the same images in the same order
    np.testing.assert_array_equal(np.asarray(build_dataset("digits", "unused", "val")[7][0]), np.asarray(val[7][0]))


def test_digits_with_transform_is_rgb_tensor():
    val = build_dataset("digits", "unused", "val", eval_transform(SIZE, (0.3,) * 3, (0.4,) * 3))
    x, _ = val[0]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32


def test_fake_dataset():
    train, val = build_dataset("fake", "unused", "pretrain"), build_dataset("fake", "unused", "val")
    assert len(train) == 256 and len(val) == 64
    image, label = train[0]
    assert image.size == (32, 32) and image.mode == "RGB" and 0 <= label < 10
    assert not np.array_equal(np.asarray(image), np.asarray(val[0][0]))  # val images are not train images


def test_imagefolder_mixed_modes_become_rgb(tmp_path):
    root = write_image_folder(tmp_path / "folder")
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith((".jpg", ".png"))]
    modes = {Image.open(f).mode for f in files}
    assert modes == {"L", "RGBA", "CMYK", "P"}  # the files really are in those modes
    train = build_dataset("imagefolder", root, "train", eval_transform(SIZE, (0.5,) * 3, (0.2,) * 3))
    val = build_dataset("imagefolder", root, "val", eval_transform(SIZE, (0.5,) * 3, (0.2,) * 3))
    assert len(train) == 9 and len(val) == 3
    assert train.classes == ["cat", "dog", "eel"]
    for x, y in list(train) + list(val):
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and 0 <= y < 3


def test_imagefolder_missing_root(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("imagefolder", str(missing), "train")
    assert str(missing / "train") in str(err.value) and "--data.root" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        _ = SSLDataModule("imagefolder", root=str(missing)).num_classes


@pytest.mark.parametrize(
    "name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("stl10", "stl10_binary")]
)
def test_torchvision_dataset_missing_without_download(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(name, str(tmp_path), "pretrain", download=False)
    message = str(err.value)
    assert str(tmp_path / folder) in message
    assert "--data.download" in message


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError) as err:
        build_dataset("imagenet-typo", "data", "train")
    message = str(err.value)
    assert "imagenet-typo" in message
    for name in ("digits", "fake", "cifar10", "cifar100", "stl10", "imagefolder"):
        assert repr(name) in message
    assert set(DATASETS) >= {"digits", "fake", "cifar10", "cifar100", "stl10", "imagefolder"}
    with pytest.raises(ValueError, match="choose one of"):
        SSLDataModule("nope")


# ------------------------------------------------------------------ DataModule
def _check_train_batches(dm: SSLDataModule, n_images: int, num_views: int = 2) -> None:
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == n_images // dm.batch_size  # drop_last: only full batches
    seen = []
    for views, labels, indices in batches:
        assert isinstance(views, list) and len(views) == num_views
        # what the model sees: in augment_on device mode the loader's uint8 views get their photometric half here
        for v in dm.device_views(views):
            assert v.shape == (dm.batch_size, 3, dm.image_size, dm.image_size) and v.dtype == torch.float32
        assert labels.shape == indices.shape == (dm.batch_size,)
        seen += indices.tolist()
    assert len(set(seen)) == len(seen) and all(0 <= i < n_images for i in seen)


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_datamodule_imagefolder(tmp_path, augment_on):
    root = write_image_folder(tmp_path / "folder")
    dm = SSLDataModule(
        "imagefolder", root=root, image_size=SIZE, batch_size=4, eval_batch_size=2, num_workers=0, augment_on=augment_on
    )
    assert dm.num_classes == 3  # read from the class folders, the stray file ignored
    dm.setup("fit")
    assert dm.num_train_samples == 9
    _check_train_batches(dm, 9)
    val = list(dm.val_dataloader())
    assert [len(y) for _, y in val] == [2, 1]  # evaluation keeps the last partial batch
    images, labels = val[0]
    assert images.shape == (2, 3, SIZE, SIZE) and labels.dtype == torch.int64
    x, y = next(iter(dm.eval_dataloader("train")))
    assert x.shape == (2, 3, SIZE, SIZE) and y.shape == (2,)


def test_datamodule_digits_defaults_and_views():
    default = SSLDataModule()
    assert default.dataset == "digits" and default.image_size == 32 and default.num_classes == 10
    assert default.mean == dataset_spec("digits").mean
    dm = SSLDataModule(image_size=SIZE, batch_size=16, eval_batch_size=8, num_workers=0, views=SimCLRViews(num_views=3))
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 1437 // 16
    views, labels, indices = next(iter(loader))
    assert len(views) == 3 and views[0].shape == (16, 3, SIZE, SIZE)
    # the index is the dataset position of the image: its label matches the dataset's
    dataset = dm._datasets["pretrain"]
    assert [dataset.base.targets[i] for i in indices.tolist()] == labels.tolist()
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, SIZE, SIZE) and labels.shape == (8,)


def test_datamodule_batch_larger_than_dataset(tmp_path):
    root = write_image_folder(tmp_path / "f")
    dm = SSLDataModule("imagefolder", root=root, image_size=SIZE, batch_size=64, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match="--data.batch_size"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="batch_size"):
        SSLDataModule(batch_size=0)


def test_datamodule_imagenette(imagenette_root):
    dm = SSLDataModule("imagefolder", root=imagenette_root, image_size=32, batch_size=16, num_workers=0)
    assert dm.num_classes == 10
    dm.setup("fit")
    assert dm.num_train_samples == 1000
    views, labels, indices = next(iter(dm.train_dataloader()))
    views = dm.device_views(views)
    assert len(views) == 2 and views[0].shape == (16, 3, 32, 32) and views[0].dtype == torch.float32
    assert not torch.equal(views[0], views[1])
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (16, 3, 32, 32) and labels.max() < 10
    assert len(dm._datasets["val"]) == 500
