"""The embedded offline benchmark ``demo``, built from installed packages only.

In-distribution: scikit-learn's bundled handwritten digits (1797 real 8x8 images),
upsampled to 32x32 RGB, split 70/30 (stratified, seed 0) into ``digits/train`` and
``digits/test``. OOD sets, each ``N_OOD`` deterministic 32x32 images:
    photo_patches  crops of scikit-learn's two bundled photographs (china.jpg, flower.jpg)
    textures       procedural gratings, checkerboards and plaid patterns in colour
    noise          uniform and Gaussian pixel noise, some blurred
    shapes         filled circles, rectangles and triangles on flat backgrounds
    mashups        near-OOD: the left half of one test digit joined to the right half of a
                   test digit of another class (digit strokes, but no digit)
All are written as PNG in ImageFolder layout under ``<root>/``, so the demo reads images
through the same code path as real benchmarks.
"""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

N_OOD = 400
SIZE = 32


def _save(img, root, cls, i):
    folder = os.path.join(root, cls)
    os.makedirs(folder, exist_ok=True)
    img.save(os.path.join(folder, f"{i:05d}.png"))


def _digits(root):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.3,
                                           stratify=d.target, random_state=0)
    for split, idx in (("train", idx_train), ("test", idx_test)):
        for i in sorted(idx):
            g = Image.fromarray((d.images[i] * (255 / 16)).astype(np.uint8), "L")
            g = g.resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
            _save(g, os.path.join(root, "digits", split), str(d.target[i]), i)


def _photo_patches(root, rng):
    from sklearn.datasets import load_sample_images
    photos = load_sample_images()
    for i in range(N_OOD):
        k = i % len(photos.images)
        src = Image.fromarray(photos.images[k])
        side = int(rng.integers(32, 160))
        x, y = int(rng.integers(0, src.width - side)), int(rng.integers(0, src.height - side))
        patch = src.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BILINEAR)
        _save(patch, os.path.join(root, "photo_patches"), ["china", "flower"][k], i)


def _textures(root, rng):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    for i in range(N_OOD):
        kind = i % 3
        c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        if kind == 0:      # grating
            theta, freq = rng.uniform(0, np.pi), rng.uniform(0.1, 0.8)
            t = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)))
        elif kind == 1:    # checkerboard
            cell = int(rng.integers(2, 9))
            t = ((xx // cell + yy // cell) % 2).astype(np.float64)
        else:              # plaid
            f1, f2 = rng.uniform(0.2, 1.0, 2)
            t = 0.25 * (2 + np.sin(f1 * xx) + np.sin(f2 * yy))
        img = t[..., None] * c1 + (1 - t[..., None]) * c2
        _save(Image.fromarray((img * 255).astype(np.uint8)), os.path.join(root, "textures"),
              ["grating", "checker", "plaid"][kind], i)


def _noise(root, rng):
    for i in range(N_OOD):
        if i % 2 == 0:
            arr = rng.uniform(0, 255, (SIZE, SIZE, 3))
        else:
            arr = np.clip(rng.normal(128, 50, (SIZE, SIZE, 3)), 0, 255)
        img = Image.fromarray(arr.astype(np.uint8))
        if i % 4 >= 2:
            img = img.filter(ImageFilter.GaussianBlur(1.0))
        _save(img, os.path.join(root, "noise"), ["uniform", "gaussian"][i % 2], i)


def _shapes(root, rng):
    for i in range(N_OOD):
        img = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            x0, y0 = rng.integers(0, 20, 2)
            x1, y1 = x0 + rng.integers(6, 16), y0 + rng.integers(6, 16)
            kind = i % 3
            if kind == 0:
                draw.ellipse([int(x0), int(y0), int(x1), int(y1)], fill=colour)
            elif kind == 1:
                draw.rectangle([int(x0), int(y0), int(x1), int(y1)], fill=colour)
            else:
                draw.polygon([(int(x0), int(y1)), (int(x1), int(y1)), (int((x0 + x1) // 2), int(y0))], fill=colour)
        _save(img, os.path.join(root, "shapes"), ["circle", "rectangle", "triangle"][i % 3], i)


def _mashups(root, rng):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    _, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.3, stratify=d.target, random_state=0)
    for i in range(N_OOD):
        a = int(rng.choice(idx_test))
        b = int(rng.choice([j for j in idx_test if d.target[j] != d.target[a]]))
        img = np.concatenate([d.images[a][:, :4], d.images[b][:, 4:]], axis=1)
        g = Image.fromarray((img * (255 / 16)).astype(np.uint8), "L")
        g = g.resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
        _save(g, os.path.join(root, "mashups"), "halves", i)


def build_demo_data(root):
    """Write the demo benchmark under ``root`` (skipped when ``root/.complete`` exists)."""
    marker = os.path.join(root, ".complete-v2")
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(0)
    _digits(root)
    _photo_patches(root, rng)
    _textures(root, rng)
    _noise(root, rng)
    _shapes(root, rng)
    _mashups(root, rng)
    open(marker, "w").close()
    return root
