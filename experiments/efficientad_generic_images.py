"""Write a folder of generic natural-image crops for EfficientAD's teacher distillation (model.head.distill_images).

    python experiments/efficientad_generic_images.py FOLDER [--count 400] [--size 128] [--seed 0]

The crops come from the real photographs and textures that ship with scikit-image (astronaut,
coffee, chelsea, rocket, hubble_deep_field, coins, moon, horse, brick, grass, gravel, ...): random
squares of a quarter to the whole of the shorter side, randomly flipped, resized to SIZE, RGB.
A stand-in for the ImageNet images of the paper when none can be downloaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
           "page", "text", "coins", "moon", "horse", "clock", "brick", "grass", "gravel", "colorwheel", "cell")


def write_generic_images(folder: Path, count: int, size: int, seed: int) -> None:
    import skimage.data

    images = []
    for name in SOURCES:
        image = np.asarray(getattr(skimage.data, name)())
        images.append(np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3])
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = images[rng.integers(len(images))]
        short = min(image.shape[:2])
        side = int(rng.integers(short // 4, short + 1))
        row, col = rng.integers(0, image.shape[0] - side + 1), rng.integers(0, image.shape[1] - side + 1)
        crop = image[row:row + side, col:col + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR) \
            .save(folder / f"{index:04d}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_generic_images(args.folder, args.count, args.size, args.seed)
