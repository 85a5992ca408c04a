"""evaluate.native_resolution: pixel metrics against the original-size masks, checked against a
brute-force computation; wired through the config, the pipeline and the report; tiled runs from
a composed config."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomax.data.images import read_mask
from anomax.evaluation import evaluate_dl_model
from anomax.evaluation.config import EvaluateConfig
from anomax.pipeline import evaluate_split, results_of
from anomax.tiling import TilingConfig
from test_tiling import HEIGHT, SHARED, WIDTH, build, dataset  # noqa: F401  (the dataset fixture)


def bilinear(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Upsampling with half-pixel centres, edges clamped, written out by hand."""
    def axis(size_in, size_out):
        source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, source - low

    (r0, r1, fr), (c0, c1, fc) = axis(small.shape[0], shape[0]), axis(small.shape[1], shape[1])
    top = small[r0][:, c0] * (1 - fc) + small[r0][:, c1] * fc
    bottom = small[r1][:, c0] * (1 - fc) + small[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]


def brute_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    """PRO at every distinct threshold: mean over connected regions of the covered fraction, against the
    FPR over the good pixels; trapezoid to FPR = limit (interpolated there), divided by limit."""
    scores = np.concatenate([m.ravel() for m in maps])
    negatives = np.concatenate([~k.ravel() for k in masks])
    regions = [(m[labels == r]) for m, k in zip(maps, masks)
               for labels, count in [ndimage.label(k, np.ones((3, 3)))] for r in range(1, count + 1)]
    thresholds = np.unique(scores)[::-1]
    fpr = np.array([(scores[negatives] >= t).mean() for t in thresholds])
    pro = np.array([np.mean([(region >= t).mean() for region in regions]) for t in thresholds])
    fpr, pro = np.r_[0, fpr], np.r_[0, pro]
    end = np.searchsorted(fpr, limit, side="right")
    if end < len(fpr):
        pro_at = pro[end - 1] + (limit - fpr[end - 1]) / (fpr[end] - fpr[end - 1]) * (pro[end] - pro[end - 1])
        fpr, pro = np.r_[fpr[:end], limit], np.r_[pro[:end], pro_at]
    return float(np.trapezoid(pro, fpr) / limit)


@pytest.fixture(scope="module")
def untiled(dataset):
    model = build("padim", TilingConfig(), size=32)
    model.fit(dataset, progress=False)
    return model


def test_native_resolution_metrics_equal_a_brute_force_on_the_original_masks(untiled, dataset):
    metrics = evaluate_dl_model(results_of(untiled, dataset, "test", progress=False, native_resolution=True),
                                exact=True, native_resolution=True)
    samples = dataset.samples_of("test")
    maps, masks = [], []
    for batch in untiled.score_split(dataset, "test", progress=False):
        for row in np.flatnonzero(batch["valid"]):
            sample = samples[batch["index"][row]]
            original = (read_mask(sample.anomaly_file_name) if sample.anomaly_file_name
                        else np.zeros((HEIGHT, WIDTH), bool))
            maps.append(bilinear(batch["anomaly_image"][row].astype(np.float64), original.shape))
            masks.append(original)
    assert maps[0].shape == (HEIGHT, WIDTH) != untiled.preprocess.height
    scores, truth = np.concatenate([m.ravel() for m in maps]), np.concatenate([k.ravel() for k in masks])
    assert metrics["pixel"]["native_resolution"] is True
    assert metrics["pixel"]["auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)
    assert metrics["pixel"]["aupro"] == pytest.approx(brute_aupro(maps, masks), abs=1e-6)
    at_model_size = evaluate_dl_model(results_of(untiled, dataset, "test", progress=False), exact=True)
    assert at_model_size["pixel"]["auroc"] != metrics["pixel"]["auroc"]  # the setting changes something


def test_native_resolution_is_wired_through_the_config_pipeline_and_report(untiled, dataset, tmp_path):
    config = EvaluateConfig(native_resolution=True, exact=True, num_worst=1)
    metrics = evaluate_split(untiled, dataset, "test", tmp_path, config, progress=False)
    direct = evaluate_dl_model(results_of(untiled, dataset, "test", progress=False, native_resolution=True),
                               exact=True, native_resolution=True)
    assert metrics["pixel"]["auroc"] == direct["pixel"]["auroc"]
    assert "at the original mask resolution" in (tmp_path / "index.html").read_text()


def test_tiled_maps_are_evaluated_at_the_original_size(dataset, tmp_path):
    model = build("padim", SHARED)
    model.fit(dataset, progress=False)
    config = EvaluateConfig(native_resolution=True, exact=True, num_worst=1)
    metrics = evaluate_split(model, dataset, "test", tmp_path, config, progress=False)
    batches = list(results_of(model, dataset, "test", progress=False))
    assert all(b["anomaly_ground_truth"].shape == b["anomaly_image"].shape == (1, HEIGHT, WIDTH) for b in batches)
    scores = np.concatenate([b["anomaly_image"].ravel() for b in batches])
    truth = np.concatenate([b["anomaly_ground_truth"].ravel() for b in batches])
    assert metrics["pixel"]["auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)
