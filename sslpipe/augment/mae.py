"""MAE's light augmentation: one random-resized crop and a flip, no colour distortion.

Masking already makes the pretext task hard; MAE reports that colour jitter hurts it. One view per
image, returned as a 1-element list so batches have the same ``views`` shape as other methods'. With
``data.augment_on device`` the workers crop and flip to uint8 and the device only normalises.
"""

from __future__ import annotations

from sslpipe.augment.simclr import SimCLRAugment, ViewRecipe


class MAEViews(ViewRecipe):
    """One light view: random-resized crop (MAE: scale 0.2-1) and horizontal flip.

    Args:
        crop_scale: area share range of the random crop.
        crop_ratio: aspect ratio range of the random crop.
        hflip_p: flip probability (0 for data where mirroring changes meaning, e.g. digits).
    """

    def __init__(
        self,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
    ) -> None:
        # A SimCLR view with every photometric op switched off is exactly crop + flip: one pipeline to maintain.
        self.augment = SimCLRAugment(
            crop_scale=tuple(crop_scale),
            crop_ratio=tuple(crop_ratio),
            hflip_p=hflip_p,
            jitter_p=0.0,
            grayscale_p=0.0,
            blur_p=0.0,
            solarize_p=0.0,
        )

    def view_settings(self) -> list[SimCLRAugment]:
        """The single crop+flip view (a 1-element list per image from every builder)."""
        return [self.augment]
