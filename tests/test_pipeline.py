"""The workflow functions on a small synthetic set: what a review found, fixed."""
import numpy as np
import pytest

from anomax.errors import ConfigError
from anomax.evaluation.config import EvaluateConfig
from anomax.pipeline import _WorstMaps, check_thresholds_possible, read_configured_dataset


def synthetic(**overrides):
    cfg = {"format": "synthetic", "size": 32, "n_train": 4, "n_test_good": 4, "n_test_defect": 4,
           "validation_from_train": 0.25, "validation_from_test": 0.0, **overrides}
    return read_configured_dataset(cfg, {}, seed=0)


def test_f1_threshold_without_defective_validation_images_fails_before_the_fit():
    """It used to crash at the very end, in save_model, on float(None)."""
    good_only = synthetic()
    with pytest.raises(ConfigError, match="'f1_image' needs defective images in the 'validation' split"):
        check_thresholds_possible(good_only, EvaluateConfig(classification_threshold="f1_image"))
    check_thresholds_possible(synthetic(validation_from_test=0.5), EvaluateConfig(classification_threshold="f1_image"))


@pytest.mark.parametrize("name", ["split", "num_good", "segmentation", "f1_pixel"])
def test_only_classification_thresholds_can_be_chosen(name):
    with pytest.raises(ConfigError, match="evaluate.classification_threshold"):
        EvaluateConfig(classification_threshold=name)


def test_results_flag_defective_images_without_a_mask():
    """Their all-zero masks are no ground truth: results_of says so, and evaluation leaves them out."""
    import dataclasses
    from types import SimpleNamespace

    from anomax.pipeline import results_of

    dataset = synthetic(validation_from_test=0.0)
    test = [i for i, s in enumerate(dataset.samples) if s.split == "test"]
    unmasked = next(i for i in test if dataset.samples[i].anomaly_label == "nok")
    samples = list(dataset.samples)
    samples[unmasked] = dataclasses.replace(samples[unmasked], anomaly_file_name=None)
    dataset = dataclasses.replace(dataset, samples=samples)
    count = len(test)
    batch = {"anomaly_image": np.zeros((count, 4, 4), np.float32), "anomaly_score": np.zeros(count, np.float32),
             "mask": np.zeros((count, 4, 4), np.uint8), "label": np.array([s.anomaly_label == "nok" for s in
                                                                          dataset.samples_of("test")], np.int32),
             "index": np.arange(count), "valid": np.ones(count, bool)}
    model = SimpleNamespace(score_split=lambda *args, **kwargs: iter([batch]), tiling=SimpleNamespace(enabled=False))
    (results,) = results_of(model, dataset, "test", progress=False)
    expected = [s.image_file_name != samples[unmasked].image_file_name for s in dataset.samples_of("test")]
    assert results["has_ground_truth"].tolist() == expected and not all(expected)


def test_streamed_evaluation_keeps_only_the_maps_the_pictures_need():
    worst = _WorstMaps(count=2)  # keeps 4 per class: a margin over the 2 shown
    rng = np.random.default_rng(0)

    def batches():
        for start in range(0, 40, 8):
            labels = (np.arange(start, start + 8) % 2).astype(np.int32)
            yield {"anomaly_image": rng.random((8, 6, 6)), "anomaly_score": rng.random(8), "anomaly_label_id": labels,
                   "anomaly_ground_truth": np.zeros((8, 6, 6), bool), "index": np.arange(start, start + 8),
                   "valid": np.ones(8, bool)}

    seen = list(worst.watch(batches()))
    scores = np.concatenate([b["anomaly_score"] for b in seen])
    labels = np.concatenate([b["anomaly_label_id"] for b in seen])
    assert [len(heap) for heap in worst.kept.values()] == [4, 4]
    highest_good = np.argsort(-np.where(labels == 0, scores, -np.inf))[:4]
    lowest_defective = np.argsort(np.where(labels == 1, scores, np.inf))[:4]
    assert {i for _, i, _ in worst.kept[0]} == set(highest_good.tolist())
    assert {i for _, i, _ in worst.kept[1]} == set(lowest_defective.tolist())
    assert worst.entry(int(highest_good[0]))["anomaly_image"].shape == (6, 6)


def test_the_anomaly_map_is_computed_once_per_inference(monkeypatch):
    """PaDiM and the student used to upsample and smooth twice (in the head and again in the model)."""
    import anomax.heads._base as base
    from anomax.heads.padim import Padim

    calls = []
    original = base.anomaly_map
    monkeypatch.setattr(base, "anomaly_map", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    features = np.random.default_rng(0).standard_normal((3, 4, 4, 2)).astype(np.float32)
    head = Padim()
    head.fit([{"features": features, "valid": np.ones(3, bool)}])
    out = head.score(head.state, np.zeros((3, 40, 40, 3), np.float32), features)
    assert len(calls) == 1 and out["anomaly_image"].shape == (3, 40, 40)


def test_apply_places_the_parameters_once_and_follows_a_refit():
    import tiny_models

    from anomax.preprocess.params import preprocess_image

    model = tiny_models.fitted_model("mobilenet_v2", "padim", {"eps": 0.01},
                                     {"pool_size": 1, "projection_dim": 8, "projection": "subset"}, size=32)
    images = list(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    first = model.apply(images)
    assert model._placed_params() is model._placed_params()  # no copy of the head state per call
    other = np.random.default_rng(1).normal(2.0, 1.0, (8, 32, 32, 3)).astype(np.float32)
    features = model._features(model.backbone.params, model.adaptor_params, other)
    model.head.fit([{"features": features, "valid": np.ones(8, bool)}])
    again = [r["anomaly_score"] for r in model.apply(images)]
    inputs = np.stack([preprocess_image(model.preprocess, image) for image in images])
    assert again == pytest.approx(list(np.asarray(model._infer(model.params, inputs)["anomaly_score"])), rel=1e-6)
    assert again[0] != pytest.approx(first[0]["anomaly_score"], rel=1e-3)


def test_apply_refuses_a_single_image_given_as_an_array():
    """One (H, W, 3) array would be taken row by row as H images; an (N, H, W, C) array is N images."""
    import tiny_models

    from anomax.errors import InputError

    model = tiny_models.fitted_model("mobilenet_v2", "padim", {"eps": 0.01},
                                     {"pool_size": 1, "projection_dim": 8, "projection": "subset"}, size=32)
    stack = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    import jax.numpy as jnp

    for wrong in (stack[0], stack[0, ..., 0], stack[..., 0], jnp.asarray(stack[0])):
        with pytest.raises(InputError, match=rf"got one array of shape \({wrong.shape[0]}, .*pass a single image as"):
            model.apply(wrong)
    as_list = [r["anomaly_score"] for r in model.apply(list(stack))]
    assert [r["anomaly_score"] for r in model.apply(stack)] == as_list
    # alone, the image runs at batch 1: another compiled program, equal to float rounding (jax 0.10.2's
    # XLA:CPU rounds PaDiM's batch-1 and batch-2 programs differently in the last bits)
    assert [r["anomaly_score"] for r in model.apply([stack[0]])] == pytest.approx(as_list[:1], rel=1e-6)


def test_worst_case_pictures_show_the_domain_the_maps_cover(tmp_path, monkeypatch):
    """With crop_domain the maps cover the domain box; the overlays drew them over the whole image."""
    from types import SimpleNamespace

    import anomax.pipeline as pipeline
    from anomax.evaluation import evaluate_dl_model
    from anomax.preprocess.params import create_dl_preprocess_param

    dataset = synthetic()
    test = dataset.samples_of("test")
    count = len(test)
    batch = {"anomaly_image": np.zeros((count, 16, 16), np.float32), "anomaly_score": np.arange(count, dtype=np.float32),
             "anomaly_label_id": np.array([s.anomaly_label == "nok" for s in test], np.int32),
             "anomaly_ground_truth": np.zeros((count, 16, 16), bool), "index": np.arange(count),
             "valid": np.ones(count, bool)}
    worst = _WorstMaps(2)
    metrics = evaluate_dl_model(list(worst.watch([batch])), num_worst=2)
    shown = []
    monkeypatch.setattr(pipeline, "plot_worst_cases", lambda path, fp, fn, **_: shown.extend(fp + fn) or path)
    monkeypatch.setattr(pipeline, "plot_anomaly_overlay", lambda path, image, *_, **__: shown.append({"image": image}))
    preprocess = create_dl_preprocess_param(width=16, height=16, domain_handling="crop_domain", domain=(0, 0, 15, 31))
    pipeline._example_pictures(SimpleNamespace(thresholds={}, preprocess=preprocess), dataset, "test", worst, metrics,
                               tmp_path, "jet")
    assert shown and all(case["image"].shape[:2] == (16, 32) for case in shown)  # rows 0-15 of the 32 x 32 images


def test_the_summary_shows_the_confusion_matrix_the_model_classifies_with():
    """With classification_threshold=largest_good the summary showed the intermediate threshold's matrix."""
    from anomax.pipeline import summary_text

    at = {name: {"threshold": value, "absolute_confusion_matrix": [[4, 1], [0, 3]]}
          for name, value in (("largest_good", 6.33), ("intermediate", 5.89))}
    record = {"summary": {"image_auroc": 0.9}, "classification_threshold": "largest_good",
              "thresholds": {"split": "validation", "num_good": 4, "num_defective": 4, "largest_good": 6.33,
                             "intermediate": 5.89},
              "metrics": {"at_thresholds": at}, "timings": {"fit_s": 1.0, "evaluate_s": 1.0, "save_s": 0.1}}
    assert "confusion matrix on test at largest_good = 6.33 (the model's classification threshold)" in \
        summary_text(record, "run")


def test_the_readme_library_workflow_runs_through_the_public_api(tmp_path):
    """README's Python steps, at a small size: results_of connects a model to the thresholds and metrics
    (score_split's batches carry 'label' and 'mask', not HALCON's result keys)."""
    import anomax

    cfg = anomax.compose_train_config(["model/head=padim", "preprocess.width=64", "preprocess.height=64"])
    dataset = anomax.read_dataset("synthetic", texture="brick", validation_from_test=0.5, root=str(tmp_path / "data"))
    model = anomax.build_model(cfg)
    model.fit(dataset, "train", progress=False)
    thresholds = anomax.compute_dl_anomaly_thresholds(anomax.results_of(model, dataset, "validation", progress=False),
                                                      split="validation")
    model.set_params(thresholds={"segmentation": thresholds.segmentation, "classification": thresholds.intermediate})
    metrics = anomax.evaluate_dl_model(anomax.results_of(model, dataset, "test", progress=False),
                                       thresholds=thresholds.classification())
    assert 0.0 <= metrics["image"]["auroc"] <= 1.0 and "intermediate" in metrics["at_thresholds"]
    saved = anomax.load_model(anomax.save_model(model, tmp_path / "my_model", thresholds=thresholds))
    assert saved.thresholds == model.thresholds


def test_apply_pads_a_short_batch_to_a_power_of_two_and_returns_copies():
    """One image costs one image's inference, not a padded batch of batch_size (a saved model keeps
    the training batch size, 16); the compiled shapes stay few; the scores are those of full batches;
    a result does not keep its batch's maps alive."""
    import jax
    import tiny_models

    from anomax.inference import apply_in_batches

    model = tiny_models.fitted_model("mobilenet_v2", "padim", {"eps": 0.01},
                                     {"pool_size": 1, "projection_dim": 8, "projection": "subset"}, size=32)
    images = list(np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8))
    seen = []

    def run(batch):
        seen.append(len(batch))
        return jax.device_get(model._infer(model.params, batch))

    for count, pad, shapes in ((1, "bucket", [1]), (3, "bucket", [4]), (11, "bucket", [8, 4]), (3, "batch", [8]),
                               (3, "none", [3])):
        seen.clear()
        results = apply_in_batches(images[:count], model.preprocess, 8, run, {}, pad=pad)
        assert seen == shapes and len(results) == count, (count, pad)
    model.set_params(batch_size=8)
    scores = [r["anomaly_score"] for r in model.apply(images[:3])]
    model.set_params(batch_size=1)
    assert scores == pytest.approx([r["anomaly_score"] for r in model.apply(images[:3])], rel=1e-5)
    assert model.apply(images[:1])[0]["anomaly_image"].base is None


def test_the_model_constructor_and_export_inference_check_their_arguments(tmp_path):
    """As set_params and export_onnx do: batch_size 0 failed at apply on range(); NaN thresholds were used,
    then failed to save; one threshold alone was silently ignored; export_inference wrote a batch of 0."""
    import tiny_models

    import anomax
    from anomax.errors import ConfigError
    from anomax.model import AnomalyModel

    model = tiny_models.fitted_model("mobilenet_v2", "padim", {"eps": 0.01},
                                     {"pool_size": 1, "projection_dim": 8, "projection": "subset"}, size=32)
    parts = (model.preprocess, model.backbone, model.adaptor, model.head)
    for kwargs, named in (({"batch_size": 0}, "'batch_size' must be an integer >= 1"),
                          ({"thresholds": {"segmentation": float("nan"), "classification": 1.0}}, "'thresholds'"),
                          ({"thresholds": {"classification": 1.0}}, "'thresholds'")):
        with pytest.raises(ConfigError, match=named):
            AnomalyModel(*parts, adaptor_params=model.adaptor_params, **kwargs)
    for value in (0, -1, None, 2.0):
        with pytest.raises(ConfigError, match=r"export_inference: batch_size must be an integer >= 1"):
            anomax.export_inference(model, tmp_path / "f.npz", batch_size=value, height=32, width=32)
    assert not (tmp_path / "f.npz").exists()


def test_a_picture_that_cannot_be_written_is_an_output_error_naming_it(tmp_path):
    import os

    from anomax.errors import OutputError
    from anomax.evaluation.pictures import plot_anomaly_overlay

    folder = tmp_path / "pictures"
    folder.mkdir()
    written = plot_anomaly_overlay(folder / "a.png", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)))
    assert written.read_bytes()[:4] == b"\x89PNG" and os.listdir(folder) == ["a.png"]  # no temporary left
    (folder / "taken").write_text("a file where a folder should be")  # fails as root too, unlike a read-only folder
    with pytest.raises(OutputError, match=r"cannot write .*taken/b.png"):
        plot_anomaly_overlay(folder / "taken" / "b.png", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)))
