"""Training augmentation chain and test-time resize, for an image plus one or more label maps.

Every transform takes an RGB uint8 (H, W, 3) array, a list of uint8 (H, W) label maps (the binary episode mask
first; optionally BAM's base-class map) and a ``numpy.random.Generator`` that supplies all randomness, so an
episode's augmentation depends only on its seed, never on DataLoader workers. They return a normalised float32
(3, S, S) tensor and int64 (S, S) maps. Void (255) is kept as 255 and used for every padded or rotated-in
label pixel; padded image pixels get the ImageNet mean (training) or 0 (test canvas) before normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .folds import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Maps = Sequence[np.ndarray]


def _to_tensors(image: np.ndarray, maps: Maps) -> tuple[torch.Tensor, torch.Tensor]:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    for m in maps:
        if m.shape != (h, w):
            raise ValueError(f"label map shape {m.shape} differs from image shape {(h, w)}")
    img = torch.from_numpy(np.require(image, np.uint8, ("C", "W"))).permute(2, 0, 1).float()
    if maps:
        lbl = torch.from_numpy(np.stack([np.asarray(m, dtype=np.uint8) for m in maps]))
    else:
        lbl = torch.empty(0, h, w, dtype=torch.uint8)
    return img, lbl


def _channel(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)


def normalize(
    img: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    inplace: bool = False,
) -> torch.Tensor:
    """(img / 255 - mean) / std for a float (3, H, W) image in 0..255."""
    out = img if inplace else img.clone()
    return out.sub_(_channel(mean) * 255.0).div_(_channel(std) * 255.0)


NEAREST_RULES = ("opencv", "floor")


def nearest_source_index(n_in: int, n_out: int, scale: float | None = None, rule: str = "opencv") -> torch.Tensor:
    """Source index of every output position of a nearest-neighbour resize from ``n_in`` to ``n_out`` samples.

    ``rule="opencv"`` (default) is OpenCV's ``INTER_NEAREST``, which the public FSS code uses for labels and masks:
    ``min(floor(x * (1 / f)), n_in - 1)`` in float64, where ``f = n_out / n_in`` (``cv2.resize`` given ``dsize``) or
    the given ``scale`` (``cv2.resize(..., fx=scale)``, as the public RandScale calls it). ``rule="floor"`` is the
    exact ``x * n_in // n_out`` in integers. The two agree on the test sizes (500 -> 472, 375 -> 354, ...) but not
    everywhere: OpenCV's rounded reciprocal lands one low where ``x * n_in / n_out`` is a whole number on some size
    pairs (2 -> 98 maps output 49 to 0, not 1). ``torch.nn.functional.interpolate(mode="nearest")`` follows neither:
    its float32 scale lands one low on other lines (500 -> 472: outputs 118 and 236 take 124 and 249, not 125, 250).
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    if rule == "floor":
        if scale is not None:
            raise ValueError("rule='floor' is defined by the two sizes; drop scale=")
        return torch.arange(n_out, dtype=torch.int64) * n_in // n_out
    if rule != "opencv":
        raise ValueError(f"unknown nearest rule {rule!r}: choose one of {', '.join(NEAREST_RULES)}")
    factor = float(scale) if scale is not None else n_out / n_in
    if not factor > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    source = torch.floor(torch.arange(n_out, dtype=torch.float64) * (1.0 / factor)).to(torch.int64)
    return source.clamp_(max=n_in - 1)


def resize_nearest(
    maps: torch.Tensor, h: int, w: int, scale: float | None = None, rule: str = "opencv"
) -> torch.Tensor:
    """Nearest-neighbour resize of label maps ``(..., H, W)`` to ``(h, w)`` by :func:`nearest_source_index`
    (``scale``: the factor ``cv2.resize(..., fx=scale, fy=scale)`` would get; ``None``: from the sizes)."""
    rows = nearest_source_index(maps.shape[-2], h, scale, rule)
    cols = nearest_source_index(maps.shape[-1], w, scale, rule)
    return maps.index_select(-2, rows).index_select(-1, cols)


def resize(
    img: torch.Tensor, lbl: torch.Tensor, h: int, w: int, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (half-pixel centres, no antialiasing) for the image, OpenCV's nearest (:func:`resize_nearest`,
    with ``scale`` when the size came from a scale factor) for the label maps."""
    img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    if lbl.shape[0]:
        lbl = resize_nearest(lbl, h, w, scale)
    return img, lbl


def rotate(img: torch.Tensor, lbl: torch.Tensor, angle: float, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate about the image centre by ``angle`` degrees (counter-clockwise), keeping the size.

    Image: bilinear, uncovered pixels = ``fill`` (3, 1, 1). Label maps: nearest, uncovered pixels = 255.
    """
    _, h, w = img.shape
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    # Output -> source in normalised coordinates; the aspect terms keep the rotation rigid in pixels.
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    img = F.grid_sample((img - fill)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    img = img + fill
    if lbl.shape[0]:
        shifted = lbl.float() - IGNORE_INDEX
        out = F.grid_sample(shifted[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
        lbl = (out + IGNORE_INDEX).round().to(torch.uint8)
    return img, lbl


def gaussian_kernel(size: int = 5, sigma: float | None = None) -> torch.Tensor:
    """1-D Gaussian taps; ``sigma=None`` derives it from the size as OpenCV does (1.1 for 5 taps)."""
    if sigma is None or sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return (k / k.sum()).float()


def gaussian_blur(img: torch.Tensor, size: int = 5, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur of a (C, H, W) image with mirrored borders (edge pixel not repeated).

    Written as weighted sums of shifted views: several times faster on CPU than a grouped conv2d."""
    taps = gaussian_kernel(size, sigma).tolist()
    p = size // 2
    _, h, w = img.shape
    x = F.pad(img[None], (p, p, p, p), mode="reflect")[0]
    rows = x[:, :, 0:w] * taps[0]
    for i in range(1, size):
        rows.add_(x[:, :, i : i + w], alpha=taps[i])
    out = rows[:, 0:h] * taps[0]
    for i in range(1, size):
        out.add_(rows[:, i : i + h], alpha=taps[i])
    return out


def pad_to(img: torch.Tensor, lbl: torch.Tensor, size: int, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to at least size x size, split evenly (extra pixel bottom/right); image = ``fill``, labels = 255."""
    _, h, w = img.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return img, lbl
    top, left = ph // 2, pw // 2
    out = fill.expand(3, h + ph, w + pw).clone()
    out[:, top : top + h, left : left + w] = img
    out_lbl = torch.full((lbl.shape[0], h + ph, w + pw), IGNORE_INDEX, dtype=torch.uint8)
    out_lbl[:, top : top + h, left : left + w] = lbl
    return out, out_lbl


def fg_crop_offsets(
    fg: torch.Tensor, size: int, rng: np.random.Generator, keep: float = 0.85, retries: int = 31
) -> tuple[int, int]:
    """Random crop corner; redraw (up to ``retries`` times) while the crop holds < ``keep`` of the fg pixels.

    The last draw is kept if none qualifies. ``fg`` is a bool (H, W) map, H, W >= size.
    """
    h, w = fg.shape
    total = int(fg.sum())
    integral = F.pad(fg.to(torch.int64).cumsum(0).cumsum(1), (1, 0, 1, 0))

    def draw() -> tuple[int, int, int]:
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        inside = integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x]
        return y, x, int(inside)

    y, x, inside = draw()
    tries = 0
    while inside < keep * total and tries < retries:
        y, x, inside = draw()
        tries += 1
    return y, x


class TrainTransform:
    """The training chain: RandScale -> RandRotate -> Gaussian blur -> horizontal flip -> fg-aware crop -> normalise.

    Defaults are the Pascal settings (crop 473, scale [0.9, 1.1]); COCO uses crop 641, scale [0.8, 1.25].
    The crop keeps >= 85% of map 0's foreground (value 1) when one of 32 draws allows it (the public loop redraws
    while its counter is <= 30, i.e. up to 31 times).
    """

    def __init__(
        self,
        size: int = 473,
        scale: tuple[float, float] = (0.9, 1.1),
        rotate: tuple[float, float] = (-10.0, 10.0),
        rotate_p: float = 0.5,
        blur_p: float = 0.5,
        blur_size: int = 5,
        flip_p: float = 0.5,
        fg_keep: float = 0.85,
        crop_retries: int = 31,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size, self.scale, self.rotate, self.rotate_p = size, scale, rotate, rotate_p
        self.blur_p, self.blur_size, self.flip_p = blur_p, blur_size, flip_p
        self.fg_keep, self.crop_retries, self.mean, self.std = fg_keep, crop_retries, mean, std
        self._fill = _channel(mean) * 255.0

    def __call__(
        self, image: np.ndarray, maps: Maps, rng: np.random.Generator
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        img, lbl = _to_tensors(image, maps)
        _, h, w = img.shape
        s = rng.uniform(*self.scale)
        # sizes rounded half to even like cv2.resize(fx=s) (saturate_cast); labels sampled with its 1 / s
        img, lbl = resize(img, lbl, max(1, round(h * s)), max(1, round(w * s)), scale=s)
        if rng.random() < self.rotate_p:
            img, lbl = rotate(img, lbl, rng.uniform(*self.rotate), self._fill)
        if rng.random() < self.blur_p:
            img = gaussian_blur(img, self.blur_size)
        if rng.random() < self.flip_p:
            img, lbl = img.flip(-1), lbl.flip(-1)
        img, lbl = pad_to(img, lbl, self.size, self._fill)
        fg = lbl[0] == 1 if lbl.shape[0] else torch.zeros(img.shape[1:], dtype=torch.bool)
        y, x = fg_crop_offsets(fg, self.size, rng, self.fg_keep, self.crop_retries)
        img = img[:, y : y + self.size, x : x + self.size]
        lbl = lbl[:, y : y + self.size, x : x + self.size]
        return normalize(img.contiguous(), self.mean, self.std, inplace=True), [m.long() for m in lbl]


def test_resize_shape(h: int, w: int, size: int, multiple_of: int = 8) -> tuple[int, int]:
    """Size of the resized image inside the canvas: longer side ``size``, shorter side scaled and floored, then
    both floored to a multiple of ``multiple_of`` (the public test code does this: 500x375 -> 472x352 at 473)."""
    m = max(h, w)
    nh, nw = h * size // m, w * size // m
    if multiple_of > 1:
        nh, nw = nh // multiple_of * multiple_of, nw // multiple_of * multiple_of
    return max(1, nh), max(1, nw)


class TestResize:
    """Test-time protocol: longer side -> ``size`` keeping the aspect ratio (sides floored to a multiple of
    ``multiple_of``, 8 as in the public code; 1 for exactly ``size``), pasted top-left on a square canvas (image 0
    before normalisation, labels 255). Compare predictions at original resolution with :func:`to_original_size`."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        size: int = 473,
        multiple_of: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.size, self.multiple_of, self.mean, self.std = size, multiple_of, mean, std

    def __call__(
        self, image: np.ndarray, maps: Maps, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        img, lbl = _to_tensors(image, maps)
        _, h, w = img.shape
        nh, nw = test_resize_shape(h, w, self.size, self.multiple_of)
        img, lbl = resize(img, lbl, nh, nw)
        canvas = torch.zeros(3, self.size, self.size)
        canvas[:, :nh, :nw] = img
        out_lbl = torch.full((lbl.shape[0], self.size, self.size), IGNORE_INDEX, dtype=torch.uint8)
        out_lbl[:, :nh, :nw] = lbl
        return normalize(canvas, self.mean, self.std, inplace=True), [m.long() for m in out_lbl]


def to_original_size(logits: torch.Tensor, orig_size: tuple[int, int], align_corners: bool = True) -> torch.Tensor:
    """Map canvas logits (..., C, S, S) back to the original (H, W): upsample bilinearly to the padded square
    max(H, W) x max(H, W), then drop the padding (the canvas holds the image top-left)."""
    h, w = int(orig_size[0]), int(orig_size[1])
    side = max(h, w)
    lead = logits.shape[:-3]
    x = logits.reshape(-1, *logits.shape[-3:])
    x = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=align_corners)
    return x[..., :h, :w].reshape(*lead, x.shape[1], h, w)
