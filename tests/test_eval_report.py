"""A run's pictures and HTML report; the report opens in headless chromium with every image loaded."""

import re

import numpy as np
import pytest

from browser import needs_chromium, page_images_in_chromium

from anomax.evaluation import (compute_dl_anomaly_thresholds, evaluate_dl_model, plot_anomaly_overlay,
                               plot_worst_cases, threshold_dl_anomaly_results, write_evaluation_pictures,
                               write_html_report)

def _split(seed, count, size=24):
    """Textured images; defective ones carry a bright blob, marked in the mask and raised in the map."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = rng.integers(60, 120, (count, size, size, 3)).astype(np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    for i in np.flatnonzero(labels):
        row, col = rng.integers(2, size - 8, 2)
        masks[i, row:row + 5, col:col + 4] = 1
        images[i][masks[i] == 1] = 230
    maps = (rng.random((count, size, size)) + 1.5 * masks).astype(np.float32)
    return {"image": images, "anomaly_image": maps, "anomaly_ground_truth": masks,
            "anomaly_score": maps.reshape(count, -1).max(1), "anomaly_label_id": labels,
            "defect_type": np.where(labels == 1, "blob", "good"), "index": np.arange(count)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    validation, test = _split(0, 6), _split(1, 8)
    thresholds = compute_dl_anomaly_thresholds(validation, split="validation", exact=True)
    metrics = evaluate_dl_model(test, thresholds=thresholds)
    results = threshold_dl_anomaly_results(test["anomaly_image"], test["anomaly_score"], thresholds.segmentation,
                                           thresholds.intermediate)
    pictures = write_evaluation_pictures(run_dir, metrics, thresholds.classification())
    for position, cmap in ((1, "jet"), (3, "hot")):
        pictures[f"overlay_{cmap}"] = plot_anomaly_overlay(
            run_dir / "pictures" / f"overlay_{cmap}.png", test["image"][position], test["anomaly_image"][position],
            cmap=cmap, ground_truth=test["anomaly_ground_truth"][position],
            region=results[position]["anomaly_region"]["mask"])

    def cases(ranked):
        return [{key: test[key][case["index"]] for key in ("image", "anomaly_image", "anomaly_score",
                                                           "anomaly_ground_truth")} for case in ranked]

    pictures["worst_cases"] = plot_worst_cases(run_dir / "pictures" / "worst_cases.png",
                                               cases(metrics["worst_false_positives"]),
                                               cases(metrics["worst_false_negatives"]))
    write_html_report(run_dir, metrics, pictures, thresholds=thresholds)
    return run_dir


def test_report_lists_metrics_and_links_every_picture_relatively(run_dir):
    page = (run_dir / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == sorted(f"pictures/{name}.png" for name in (
        "score_histogram", "roc", "pro", "overlay_jet", "overlay_hot", "worst_cases"))
    assert all((run_dir / source).stat().st_size > 1000 for source in sources)
    for heading in ("Image metrics", "Pixel metrics", "Thresholds", "At classification threshold 'intermediate'"):
        assert heading in page
    assert "blob" in page and "AUPRO" in page


@needs_chromium
def test_report_opens_in_headless_chromium_with_every_image_loaded(run_dir):
    assert page_images_in_chromium(run_dir / "index.html") == "ALL-IMAGES-LOADED"
    broken = run_dir / "broken.html"  # the probe itself must notice a missing picture
    broken.write_text('<html><head><title>x</title></head><body><img src="pictures/missing.png"></body></html>')
    assert page_images_in_chromium(broken) == "pictures/missing.png"


def test_a_gray_image_is_drawn_as_its_rgb_copy_and_any_file_name_is_a_title(tmp_path):
    """Gray overlays were contrast-stretched (a uniform image drawn black), RGB ones were not; a '$' in a
    file name was read as mathtext and crashed anomax-predict."""
    from PIL import Image

    gray = np.full((20, 20), 100, np.uint8)
    gray[:, 10:] = 110
    drawn = {}
    for name, image in (("gray", gray), ("rgb", np.repeat(gray[..., None], 3, -1))):
        path = plot_anomaly_overlay(tmp_path / f"{name}.png", image, np.zeros((4, 4), np.float32), cmap="gray",
                                    value_range=(0.0, 1.0), title="price_$5_$.png")
        drawn[name] = np.asarray(Image.open(path).convert("RGB"), np.int16)
    assert np.abs(drawn["gray"] - drawn["rgb"]).max() <= 1


def test_a_large_part_is_drawn_from_a_reduced_copy_that_keeps_peaks_and_small_defects(tmp_path, monkeypatch):
    """A 5-Mpx part drawn at full size cost 1-2 GB and seconds per picture. The copy drawn keeps each
    block's maximum: the map's peak value, and a one-pixel defect's outline."""
    import anomax.evaluation.pictures as pictures

    height, width = 2100, 1500
    anomaly_image = np.zeros((height, width), np.float32)
    anomaly_image[2099, 1499] = 7.0  # in the last, partial block
    mask = np.zeros((height, width), bool)
    mask[1000, 700] = True
    drawn = []
    original = pictures._reduced
    monkeypatch.setattr(pictures, "_reduced", lambda array: drawn.append(original(array)) or drawn[-1])
    plot_anomaly_overlay(tmp_path / "large.png", np.zeros((height, width, 3), np.uint8), anomaly_image,
                         ground_truth=mask, region=None)
    reduced_map, reduced_mask = drawn
    assert max(reduced_map.shape) <= 1024 and reduced_map.max() == 7.0 and reduced_map[-1, -1] == 7.0
    assert reduced_mask.sum() == 1 and reduced_mask.shape == reduced_map.shape
    small = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert original(small) is not None and np.array_equal(original(small), small)  # small ones as they are
