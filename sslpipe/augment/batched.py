"""The photometric half of a view, batched on the training device (``data.augment_on device``).

Loader workers hand over fixed-size uint8 views (decode + crop + flip, :meth:`ViewRecipe.build_geometric`); after
the batch reaches the device, :class:`BatchedPhotometric` draws every random parameter per sample from a
``torch.Generator`` on that device and applies, in torchvision's order and with torchvision's distributions:

1. colour jitter with probability ``jitter_p``: brightness, contrast, saturation and hue factors drawn uniformly
   per sample (``[max(0, 1-b), 1+b]``; hue ``[-h, h]``) and applied in a **per-sample random order**, as
   ``v2.ColorJitter`` draws ``randperm(4)`` per call;
2. grayscale with probability ``grayscale_p`` (ITU-R 601-2 luma, as torchvision);
3. Gaussian blur with probability ``blur_p``, sigma uniform in ``blur_sigma`` per sample (one sigma for both
   axes), the same odd kernel side as the per-sample path, reflect padding;
4. solarisation with probability ``solarize_p``: values ``>= 128/255`` become ``1 - x``;
5. normalisation by the dataset's mean and std.

Own ops, not kornia 0.9 (checked in its source): ``ColorJitter``/``ColorJiggle`` draw one order (``randperm(4)``)
per *batch*, not per sample; ``RandomSolarize`` draws a random threshold around 0.5 (``thresholds=0.1``) and
adds a random brightness (``additions``) unless both are zeroed, and its 0.5 is not torchvision's 128/255; and
every kornia augmentation draws its parameters from the global RNG, with no ``generator`` argument, so streams
could not be seeded per rank without reseeding the global generator the methods use. The ops below are a few
lines each, all element-wise or a depthwise convolution.

Differences from the per-sample uint8 path, by design: values stay float between ops (torchvision rounds or
truncates to uint8 after each op, shifting means by at most ~1/255 per op), and contrast/saturation use the
unfloored luma. tests/test_augment_device.py compares the two paths' statistics within stated tolerances.

Everything is shape-static and free of host syncs: skipped ops are identity factors or ``torch.where`` masks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sslpipe.augment.simclr import SimCLRAugment

# Solarisation inverts every value at or above this uint8 level (torchvision's RandomSolarize threshold as SimCLR's
# recipes use it; BYOL's 0.5 of the range). The batched path compares float views at ``SOLARIZE_THRESHOLD / 255``.
SOLARIZE_THRESHOLD = 128
# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
LUMA = (0.2989, 0.587, 0.114)

#: ``(views, generator) -> views``: the device half of a recipe, as :meth:`ViewRecipe.build_batched` returns it.
BatchedAugment = Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]]


def blur_kernel_size(aug: SimCLRAugment, image_size: int) -> int:
    """Side of the Gaussian blur kernel: ``blur_kernel_fraction`` of the image side, made odd, at least 3."""
    return max(3, int(aug.blur_kernel_fraction * image_size) // 2 * 2 + 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` grayscale of float RGB ``(N, 3, H, W)``."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """HSV of float RGB in [0, 1], ``(N, 3, H, W)``; hue in [0, 1) (torchvision's formula, grey pixels hue 0)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    grey = delta == 0
    safe = torch.where(grey, torch.ones_like(delta), delta)
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(grey, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Float RGB of HSV ``(N, 3, H, W)``: channel n is ``v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6``
    for n = 5, 3, 1 (R, G, B): the closed form of the six-sector table torchvision indexes."""
    h, s, v = x.unbind(1)
    vs = v * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(6.0 * h + n, 6.0)
        channels.append(v - vs * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of float RGB ``(N, 3, H, W)`` by ``shift`` ``(N,)`` turns (torchvision's hue factor)."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1)).clamp(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor, kernel: int) -> torch.Tensor:
    """Blur each image of ``(N, C, H, W)`` with its own ``sigma`` where ``apply`` (an identity kernel elsewhere).

    Separable: a ``kernel``-tap Gaussian per sample (torchvision's ``exp(-d^2 / 2 sigma^2)``, normalised), run as
    two depthwise convolutions over the ``N*C`` channels after reflect padding.
    """
    n, c, h, w = x.shape
    d = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    weights = torch.softmax(-(d.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1) ** 2), dim=1)  # (N, K)
    weights = torch.where(apply.view(-1, 1), weights, (d == 0).to(x.dtype).expand(n, -1))
    weights = weights.repeat_interleave(c, dim=0)  # (N*C, K): channel i of sample j -> row j*C + i
    pad = kernel // 2
    out = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, weights.view(n * c, 1, 1, kernel), groups=n * c)
    out = F.conv2d(out, weights.view(n * c, 1, kernel, 1), groups=n * c)
    return out.view(n, c, h, w)


def color_jitter(
    x: torch.Tensor,
    blend: torch.Tensor,
    hue: torch.Tensor | None,
    order: torch.Tensor,
    hue_groups: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """torchvision's brightness, contrast, saturation and hue adjustments with per-sample factors and order.

    Args:
        x: float RGB ``(N, 3, H, W)`` in [0, 1].
        blend: ``(N, 3)`` brightness, contrast and saturation factors (1 = unchanged).
        hue: ``(N,)`` hue shifts in turns, or ``None`` to skip the hue op (hue range 0).
        order: ``(N, 4)`` a permutation of 0..3 per sample (0 brightness, 1 contrast, 2 saturation, 3 hue):
            sample i applies op ``order[i, 0]`` first.
        hue_groups: optional, for each slot the indices of the samples whose hue op sits in that slot (what
            :func:`draw_jitter_order` returns). The hue conversion is the costly op (~6x a blend); with the groups
            each sample is converted once, at its slot, instead of the whole batch at every slot.
    """
    for slot in range(4):
        op = order[:, slot].view(-1, 1, 1, 1)
        grey = luma(x)
        # One blend x' = f x + (1 - f) t covers the first three: t = 0, the mean luma, the pixel's luma.
        target = torch.where(
            op == 0,
            torch.zeros_like(grey),
            torch.where(op == 1, grey.mean((1, 2, 3), keepdim=True).expand_as(grey), grey),
        )
        factor = blend.gather(1, order[:, slot : slot + 1].clamp(max=2)).view(-1, 1, 1, 1)
        factor = torch.where(op == 3, torch.ones_like(factor), factor)  # the hue slot: no blend
        x = (factor * x + (1.0 - factor) * target).clamp(0.0, 1.0)
        if hue is not None and hue_groups is not None:
            rows = hue_groups[slot]  # may hold the padding index n (a scratch row, dropped again)
            padded, shift = torch.cat([x, x[:1]]), torch.cat([hue, hue[:1]])
            converted = adjust_hue(padded.index_select(0, rows), shift.index_select(0, rows))
            x = padded.index_copy(0, rows, converted)[: x.shape[0]]
        elif hue is not None:
            x = torch.where(op == 3, adjust_hue(x, hue), x)
    return x


def draw_jitter_order(
    n: int, device: torch.device, generator: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-sample orders of the four jitter ops, drawn so that the hue slots split the batch into fixed-size groups.

    Each sample's order is uniform over the 24 permutations, as in torchvision: the batch is padded to ``m``, a
    multiple of 4, and shuffled; the sample at position ``p`` puts its hue op in slot ``p % 4`` (uniform, as its
    position is), and the three blend ops fill the other slots in a uniform random order. Only the joint draw is
    stratified (at most ``m / 4`` samples share a hue slot), which lets :func:`color_jitter` convert each sample
    to HSV once with static shapes: ``groups[k]`` holds the ``m / 4`` rows whose hue op is in slot ``k``, the
    padding positions pointing at row ``n`` (a scratch row).

    Returns:
        ``order`` ``(n, 4)`` (0 brightness, 1 contrast, 2 saturation, 3 hue) and the four index tensors.
    """
    m = -(-n // 4) * 4
    perm = torch.randperm(m, device=device, generator=generator)
    position = torch.empty(m, dtype=torch.long, device=device).scatter_(0, perm, torch.arange(m, device=device))
    hue_slot = (position[:n] % 4).view(-1, 1)
    groups = [perm[k::4].clamp(max=n) for k in range(4)]
    others = torch.rand(n, 3, device=device, generator=generator).argsort(1)  # blend ops 0..2, random order
    # the three non-hue slots of each row, in increasing order (no boolean mask: no host sync), get the blend ops
    first_three = torch.arange(3, device=device).expand(n, 3)
    free = first_three + (first_three >= hue_slot).long()
    order = torch.empty(n, 4, dtype=torch.long, device=device)
    order.scatter_(1, hue_slot, 3)
    order.scatter_(1, free, others)
    return order, groups


def _constant(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """A float32 tensor of ``values`` on ``device`` (callers cache it: one copy per device, not per batch)."""
    return torch.tensor(list(values), dtype=torch.float32).to(device)


class BatchedPhotometric:
    """The photometric ops of one :class:`~sslpipe.augment.simclr.SimCLRAugment` over a batch, then normalisation.

    Call with uint8 ``(N, 3, H, W)`` on the device and a generator on the same device; returns normalised float32.
    Parameters are drawn in a fixed order (jitter, grayscale, blur, solarise), a fixed count per op whatever
    the outcome, so a seed gives the same views on the same device.

    Args:
        aug: the view's settings (the single source of every probability and range).
        image_size: side of the views (sets the blur kernel, as in the per-sample path).
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
    """

    def __init__(self, aug: SimCLRAugment, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.aug = aug
        self.kernel = blur_kernel_size(aug, image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self._constants: dict[torch.device, dict[str, torch.Tensor]] = {}
        # [low, high] of the blend factors (brightness, contrast, saturation) and the hue shift, as v2.ColorJitter.
        self.blend_ranges = [(max(0.0, 1.0 - v), 1.0 + v) for v in (aug.brightness, aug.contrast, aug.saturation)]
        self.jitter = aug.jitter_p > 0 and (any(v > 0 for v in (aug.brightness, aug.contrast, aug.saturation, aug.hue)))

    def __repr__(self) -> str:
        return f"BatchedPhotometric({self.aug}, kernel={self.kernel})"

    def constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Normalisation and jitter-range tensors on ``device``, made on first use: later batches copy nothing."""
        if device not in self._constants:
            low, high = zip(*self.blend_ranges)
            self._constants[device] = {
                "mean": _constant(self.mean, device).view(1, -1, 1, 1),
                "std": _constant(self.std, device).view(1, -1, 1, 1),
                "blend_low": _constant(low, device),
                "blend_width": _constant([h - lo for lo, h in zip(low, high)], device),
            }
        return self._constants[device]

    def color_jitter(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw per-sample jitter factors, application and order, then :func:`color_jitter`."""
        aug, n = self.aug, x.shape[0]
        u = torch.rand(n, 5, device=x.device, generator=generator)
        apply = u[:, 4] < aug.jitter_p
        const = self.constants(x.device)
        blend = const["blend_low"] + const["blend_width"] * u[:, :3]  # (N, 3): brightness, contrast, saturation
        blend = torch.where(apply.view(-1, 1), blend, torch.ones_like(blend))  # not jittered: identity factors
        hue = aug.hue * (2.0 * u[:, 3] - 1.0)
        hue = torch.where(apply, hue, torch.zeros_like(hue))
        order, hue_groups = draw_jitter_order(n, x.device, generator)  # a uniform permutation per row
        return color_jitter(x, blend, hue if aug.hue > 0 else None, order, hue_groups)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Normalised float32 views of uint8 ``images`` ``(N, 3, H, W)``."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"the batched photometric path takes uint8 (N, 3, H, W) views from build_geometric, got "
                f"{images.dtype} {tuple(images.shape)}; float input means the views were already augmented and "
                "normalised on the CPU (data.augment_on cpu)"
            )
        aug, n = self.aug, images.shape[0]
        x = images.float() / 255.0
        if self.jitter:
            x = self.color_jitter(x, generator)
        if aug.grayscale_p > 0:
            gray = torch.rand(n, device=x.device, generator=generator) < aug.grayscale_p
            x = torch.where(gray.view(-1, 1, 1, 1), luma(x).expand_as(x), x)
        if aug.blur_p > 0:
            u = torch.rand(n, 2, device=x.device, generator=generator)
            sigma = aug.blur_sigma[0] + (aug.blur_sigma[1] - aug.blur_sigma[0]) * u[:, 0]
            x = gaussian_blur(x, sigma, u[:, 1] < aug.blur_p, self.kernel)
        if aug.solarize_p > 0:
            solarize = torch.rand(n, device=x.device, generator=generator) < aug.solarize_p
            x = torch.where(solarize.view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD / 255.0), 1.0 - x, x)
        const = self.constants(x.device)
        return (x - const["mean"]) / const["std"]


class BatchedViews:
    """One :class:`BatchedPhotometric` per view of a multi-view batch (views may differ: asymmetric recipes)."""

    def __init__(self, per_view: Sequence[Callable[[torch.Tensor, torch.Generator], torch.Tensor]]) -> None:
        self.per_view = list(per_view)

    def __call__(self, views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        if len(views) != len(self.per_view):
            raise ValueError(f"expected {len(self.per_view)} views from the loader, got {len(views)}")
        return [augment(v, generator) for augment, v in zip(self.per_view, views)]

    def __repr__(self) -> str:
        return f"BatchedViews({self.per_view})"
