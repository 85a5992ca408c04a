"""Deployment: the whole inference exported as ONNX (``onnx_export``) and run by onnxruntime or
OpenVINO behind the same ``apply`` as the JAX model (``runtimes``). Needs ``anomax[deploy]``."""
