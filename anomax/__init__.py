"""anomax: industrial image anomaly detection in JAX — the HALCON workflow, open.

The workflow, one public function per step (HALCON's names where it has one):
read_dl_dataset_anomaly / read_dataset -> split_dl_dataset -> create_dl_preprocess_param
-> build_model + AnomalyModel.fit -> results_of + compute_dl_anomaly_thresholds -> evaluate_dl_model
-> threshold_dl_anomaly_results; save_model / load_model (write_dl_model / read_dl_model).
"""
__version__ = "0.1.0"

# name -> module. Imported on first use, so `import anomax` stays light (JAX loads with the first model call).
_PUBLIC = {
    "read_dl_dataset_anomaly": "anomax.data.dataset", "read_dataset": "anomax.data.dataset",
    "split_dl_dataset": "anomax.data.dataset", "DLDataset": "anomax.data.dataset",
    "make_synthetic_dataset": "anomax.data.synthetic",
    "create_dl_preprocess_param": "anomax.preprocess.params", "preprocess_image": "anomax.preprocess.params",
    "build_backbone": "anomax.backbones", "backbone_requirements": "anomax.backbones",
    "FeatureAdaptor": "anomax.features", "AnomalyModel": "anomax.model",
    "build_model": "anomax.pipeline", "train_and_evaluate": "anomax.pipeline", "results_of": "anomax.pipeline",
    "compose_train_config": "anomax.apps.config",
    "compute_dl_anomaly_thresholds": "anomax.evaluation", "threshold_dl_anomaly_results": "anomax.evaluation",
    "evaluate_dl_model": "anomax.evaluation",
    "load_model": "anomax.artifact", "save_model": "anomax.artifact", "read_dl_model": "anomax.artifact",
    "write_dl_model": "anomax.artifact", "export_inference": "anomax.artifact", "load_exported": "anomax.artifact",
    "export_onnx": "anomax.deploy.onnx_export",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'anomax' has no attribute {name!r}")


__all__ = ["__version__", *_PUBLIC]


def __dir__() -> list[str]:  # the lazy names too, for dir() and tab completion
    return sorted({*globals(), *_PUBLIC})
