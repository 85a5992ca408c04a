"""Head inputs as the model hands them over: fixed-shape batches, the last one padded (valid=False)."""

import numpy as np

IMAGE = np.zeros((4, 24, 24, 3), np.float32)  # statistical heads ignore the images


def batches_of(features, batch=4):
    """The padding is garbage (1e3) on purpose: a head that reads it fails the tests."""
    n = len(features)
    padded = np.concatenate([features, np.full((-n % batch, *features.shape[1:]), 1e3, np.float32)])
    valid = np.arange(len(padded)) < n
    return [{"image": IMAGE, "features": padded[i:i + batch], "valid": valid[i:i + batch]}
            for i in range(0, len(padded), batch)]


def grid_images(features):
    """Images of the feature grid's size: with sigma=0 a head's anomaly_image is then its patch scores."""
    return np.zeros((*features.shape[:3], 3), np.float32)
