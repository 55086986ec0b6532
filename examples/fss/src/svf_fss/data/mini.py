"""Offline mini benchmark in the Pascal VOC layout, generated deterministically from real images.

20 classes with exact masks: Fashion-MNIST product photos (odd class ids 1, 3, .., 19) and scikit-learn's 8x8
handwritten digits (even ids 2, 4, .., 20), pasted onto crops of the real photos bundled with scikit-image and
scikit-learn. Written as ``JPEGImages/*.jpg``, ``SegmentationClassAug/*.png`` (0 background, 1..20 classes,
255 = a one-pixel void band on both sides of every object outline, like VOC) and ``lists/{train,val}.txt``, so
``PascalDataset(root=OUT, fold=f)`` runs the real Pascal-5i path (folds, 2048-pixel rule, trick, episodes).

Every image has one "main" object of a balanced class covering >= 2048 pixels plus 0-2 other objects of other
classes at random sizes (they may or may not reach 2048 pixels, and may occlude each other). Train images use
even-indexed source objects, val images odd-indexed ones.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import FASHION_HELP, DataError
from .folds import IGNORE_INDEX, MIN_PIXELS, MINI_CLASSES
from .lists import write_list

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
SIZES = ((120, 160), (160, 120), (144, 144), (128, 160), (160, 128), (112, 160), (160, 112))  # (h, w)
EXTRA_COUNTS, EXTRA_P = (0, 1, 2), (0.3, 0.45, 0.25)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the mini benchmark needs the {name} package (real photos it bundles): "
            "pip install 'svf-fss[mini]' (scikit-image, scikit-learn)"
        )
    return Path(spec.submodule_search_locations[0])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion(fashion_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST test set (10,000 x 28 x 28 uint8, labels 0..9); background is exactly 0."""
    folder = Path(fashion_dir or os.environ.get("SVF_FSS_FASHION_MNIST") or FASHION_DIR)
    images, labels = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        raise DataError(f"Fashion-MNIST not found in {folder}. {FASHION_HELP}")
    return _read_idx(images), _read_idx(labels)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 x 8 x 8 values 0..16, labels 0..9), read without importing it."""
    path = _package_dir("sklearn") / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"scikit-learn's digits file is missing ({path}); reinstall scikit-learn")
    data = np.loadtxt(path, delimiter=",", dtype=np.float64)
    return data[:, :64].reshape(-1, 8, 8), data[:, 64].astype(np.int64)


def load_backgrounds(max_side: int = 320) -> list[np.ndarray]:
    """The real photos bundled with scikit-image and scikit-learn, RGB uint8, longer side <= ``max_side``."""
    paths = [_package_dir("skimage") / "data" / n for n in SKIMAGE_PHOTOS]
    paths += [_package_dir("sklearn") / "datasets" / "images" / n for n in SKLEARN_PHOTOS]
    photos = []
    for p in paths:
        if not p.is_file():
            continue
        with Image.open(p) as im:
            im = im.convert("RGB")
            scale = max_side / max(im.size)
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
            photos.append(np.asarray(im))
    if len(photos) < 5:
        raise DataError("too few bundled photos found; pip install 'svf-fss[mini]' (scikit-image, scikit-learn)")
    return photos


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR))


def _background(rng: np.random.Generator, photos: list[np.ndarray], h: int, w: int) -> np.ndarray:
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    f = rng.uniform(0.35, 1.0) * min(ph / h, pw / w)
    ch, cw = max(8, int(h * f)), max(8, int(w * f))
    y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    out = _resize(np.ascontiguousarray(photo[y : y + ch, x : x + cw]), h, w).astype(np.float32)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _tint(rng: np.random.Generator) -> np.ndarray:
    """A random saturated colour (uint8 RGB range floats)."""
    c = rng.uniform(0.15, 1.0, 3)
    c[int(rng.integers(3))] = rng.uniform(0.8, 1.0)
    return c * 255.0


def _solid_mask(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a mask with its holes filled (dark pixels inside a product photo are
    still the object)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    return ndimage.binary_fill_holes(lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1))


class _Sources:
    """Object sprites per mini class id: Fashion-MNIST for odd ids, digits for even ids."""

    def __init__(self, fashion: tuple[np.ndarray, np.ndarray], digits: tuple[np.ndarray, np.ndarray], parity: int):
        self.fashion_x, self.digit_x = fashion[0], digits[0]
        self._solid: dict[int, np.ndarray] = {}
        self.pool = {}
        for k in range(10):
            self.pool[2 * k + 1] = np.flatnonzero(fashion[1] == k)[parity::2]
            self.pool[2 * k + 2] = np.flatnonzero(digits[1] == k)[parity::2]
        self.alpha = {}
        for cls in self.pool:
            a = self.fashion_x[self.pool[cls]] > 0 if cls % 2 else self.digit_x[self.pool[cls]] / 16.0 > 0.4
            self.alpha[cls] = a.reshape(len(a), -1).mean(1)  # fill fraction of the object's box

    def sprite(self, rng: np.random.Generator, cls: int, side_lo: int, side_hi: int, min_area: int = 0):
        """(rgb float (L, L, 3), mask bool (L, L)) of a random instance; sized to reach ``min_area`` if asked."""
        for _ in range(100):
            j = int(rng.integers(len(self.pool[cls])))
            lo = max(side_lo, int(np.ceil(np.sqrt(min_area / max(self.alpha[cls][j], 1e-3)))))
            if lo <= side_hi:
                break
        else:
            lo = side_hi
        side = int(rng.integers(lo, side_hi + 1))
        idx = self.pool[cls][j]
        if cls % 2:  # Fashion-MNIST: grey product photo, background exactly 0
            g = self.fashion_x[idx]
            up = _resize(g, side, side).astype(np.float32) / 255.0
            if idx not in self._solid:
                self._solid[idx] = _solid_mask(g > 0)
            mask = _resize(self._solid[idx].astype(np.uint8) * 255, side, side) > 127
            rgb = _tint(rng) * (0.3 + 0.7 * up[..., None])
        else:  # digit: ink intensity 0..16
            v = (self.digit_x[idx] * (255.0 / 16.0)).astype(np.uint8)
            up = _resize(v, side, side).astype(np.float32) / 255.0
            mask = up > 0.4
            rgb = _tint(rng) * (0.55 + 0.45 * up[..., None])
        return rgb, mask


def _void_band(label: np.ndarray) -> np.ndarray:
    """Set to 255 every pixel whose 4-neighbour has another value (a 2-pixel band along each outline)."""
    edge = np.zeros(label.shape, dtype=bool)
    dy = label[1:] != label[:-1]
    dx = label[:, 1:] != label[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    out = label.copy()
    out[edge] = IGNORE_INDEX
    return out


def _compose(rng, photos, sources: _Sources, main: int, min_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = SIZES[int(rng.integers(len(SIZES)))]
    for _ in range(50):
        image = _background(rng, photos, h, w)
        label = np.zeros((h, w), dtype=np.uint8)
        n_extra = int(rng.choice(EXTRA_COUNTS, p=EXTRA_P))
        others = [c for c in range(1, 21) if c != main]
        classes = [main] + [int(c) for c in rng.choice(others, size=n_extra, replace=False)]
        top = min(h, w) - 4
        sprites = [sources.sprite(rng, main, 56, top, int(min_pixels * 1.3))]
        sprites += [sources.sprite(rng, c, 20, int(0.75 * top)) for c in classes[1:]]
        for k in rng.permutation(len(classes)):
            rgb, mask = sprites[k]
            side = mask.shape[0]
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            image[y : y + side, x : x + side][mask] = rgb[mask]
            label[y : y + side, x : x + side][mask] = classes[k]
        label = _void_band(label)
        if (label == main).sum() >= min_pixels:
            break
    return np.clip(image + rng.normal(0.0, 3.0, image.shape), 0, 255).astype(np.uint8), label


def make_mini(
    out_dir: str | Path,
    seed: int = 0,
    train_images: int = 320,
    val_images: int = 160,
    fashion_dir: str | Path | None = None,
    min_pixels: int = MIN_PIXELS,
) -> dict[str, int]:
    """Generate the mini benchmark into ``out_dir`` (deterministic in ``seed``); returns images per split."""
    out = Path(out_dir)
    fashion, digits, photos = load_fashion(fashion_dir), load_digits(), load_backgrounds()
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    counts = {}
    for parity, (split, n) in enumerate((("train", train_images), ("val", val_images))):
        rng = np.random.default_rng([seed, parity])
        sources = _Sources(fashion, digits, parity)
        mains = rng.permutation(np.resize(np.arange(1, 21), n))
        pairs = []
        for i, main in enumerate(mains):
            key = f"{split}_{i:05d}"
            image, label = _compose(rng, photos, sources, int(main), min_pixels)
            Image.fromarray(image).save(out / "JPEGImages" / f"{key}.jpg", quality=90)
            Image.fromarray(label).save(out / "SegmentationClassAug" / f"{key}.png")
            pairs.append((f"JPEGImages/{key}.jpg", f"SegmentationClassAug/{key}.png"))
        write_list(pairs, out / "lists" / f"{split}.txt")
        counts[split] = n
    (out / "classes.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(MINI_CLASSES, 1)))
    (out / "README.txt").write_text(
        "svf-fss mini benchmark (Pascal VOC layout), generated by `svf-fss make-mini` "
        f"with seed {seed}.\nObjects: Fashion-MNIST test set (MIT licence, Zalando Research) for odd class ids, "
        "scikit-learn's 8x8 digits (UCI optical digits) for even ids. Backgrounds: photos bundled with "
        "scikit-image and scikit-learn (see those packages for their licences).\n"
    )
    return counts
