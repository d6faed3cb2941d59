"""Reading one image file as 8-bit RGB: the loader every folder dataset uses, and the check the scan runs.

PIL's ``convert("RGB")`` is right for most files but wrong for three kinds of valid ones:

- 16-bit greyscale (``I;16``, ``I;16B``, ``I``, e.g. 16-bit PNG/TIFF): it clips every value above 255 to
  white instead of scaling; :func:`to_rgb` scales by the bit depth (``round(v * 255 / 65535)``).
- transparent images (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry): it drops alpha and shows
  whatever colour the file stores under transparent pixels, often black, so dark line art or text on a
  transparent background disappears; :func:`to_rgb` composites on **white**, the background such images
  (logos, icons, product photos, drawings) are made to be seen on.
- palette images with transparency: PIL warns and converts through the palette; here through RGBA, as above.

Greyscale (``L``, ``1``), ``CMYK``, ``YCbCr`` and 8-bit palette images go through ``convert("RGB")``.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image

# Extensions (lower case, compared case-insensitively) of the files folder datasets read; others are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_BACKGROUND = (255, 255, 255, 255)  # white: see the module docstring


def is_image_file(name: str) -> bool:
    """Whether ``name`` has one of :data:`IMAGE_EXTENSIONS` (any case) and is not hidden (``.`` prefix).

    Hidden files are never data: macOS ``._x.jpg`` resource forks, ``.DS_Store``, editor back-ups.
    """
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _bit_depth(image: Image.Image) -> int:
    """Bits per sample of an integer greyscale image: 16, or 32 where a TIFF says so (PIL mode ``I``)."""
    if image.mode == "I":
        tags = getattr(image, "tag_v2", None)
        bits = tags.get(258) if tags is not None else None  # TIFF BitsPerSample
        if bits is not None:
            return int(max(bits) if isinstance(bits, (tuple, list)) else bits)
    return 16


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: alpha composited on white, 16/32-bit greyscale scaled by its bit depth."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        top = (1 << _bit_depth(image)) - 1  # 65535 for 16-bit data
        top = min(top, 2**31 - 1)  # mode I is signed 32-bit
        values = np.asarray(image).astype(np.int64).clip(0, top)
        eight = ((values * 255 + top // 2) // top).astype(np.uint8)  # round(v * 255 / top)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` (the first frame of animations and multi-page TIFFs) and return it as 8-bit RGB."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
        return to_rgb(image)


def image_problem(path: str, size: Optional[int] = None) -> Optional[str]:
    """Why :func:`load_rgb` would fail on ``path``, or ``None`` when it reads.

    Decodes the whole file, as training will: ``Image.verify()`` does not read JPEG data, so it passes
    truncated JPEGs that fail at training time. JPEGs are decoded at 1/8 scale (``draft``): the scaled
    IDCT is cheaper but still consumes every byte, so truncation anywhere fails the same way as a full
    decode (checked against full decodes in tests/test_data_scan.py).

    Args:
        path: the image file.
        size: its size in bytes if already known (saves a ``stat``).
    """
    try:
        if (os.path.getsize(path) if size is None else size) == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as f:
            image = Image.open(f)
            image.draft(image.mode, (1, 1))  # JPEG only: decode at the smallest DCT scale
            image.load()
            to_rgb(image)
    except Image.UnidentifiedImageError:
        return "not an image PIL can read"
    except Exception as err:  # any decoder failure means training would fail on this file
        return f"{type(err).__name__}: {err}"  # e.g. "OSError: image file is truncated (222 bytes not processed)"
    return None
