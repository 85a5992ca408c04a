"""Data parallelism over 4 simulated CPU devices gives the single-device results.

XLA_FLAGS must be set before jax is imported, so the 4-device run is a fresh python
process; it fits and scores each head on one device and on all four and saves both.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

FOUR_DEVICES = r"""
import json, sys
import jax, numpy as np
from anomax.backbones import backbone_requirements, build_backbone
from anomax.data.dataset import read_dataset
from anomax.errors import ConfigError, InputError
from anomax.features import FeatureAdaptor
from anomax.kernels.stats import covariance, init_moments, update_moments
from anomax.kernels.neighbors import nearest_neighbors, sharded_nearest_neighbors
from anomax.model import AnomalyModel
from anomax.parallel import data_mesh, shard_batch
from anomax.preprocess.params import create_dl_preprocess_param
from anomax.registry import HEADS

out, root = sys.argv[1], sys.argv[2]
assert jax.device_count() == 4, jax.devices()
dataset = read_dataset("synthetic", root=root, size=64, n_train=6, n_test_good=2, n_test_defect=6,
                       validation_from_train=0.0)
requirements = {k: v for k, v in backbone_requirements("resnet18").items() if k != "input_multiple"}
preprocess = create_dl_preprocess_param(width=64, height=64, **requirements)
setups = {"padim": ({}, {"pool_size": 1, "projection_dim": 12, "projection": "subset"}),
          "patchcore": ({"coreset_size": 37, "num_neighbors": 3, "chunk_size": 8}, {"projection_dim": 16})}
arrays, errors = {}, {}
for head_name, (hyperparams, adaptor_kwargs) in setups.items():
    for devices in ("cpu:0", "all"):
        backbone = build_backbone("resnet18", pretrained=None, width_multiplier=0.25)
        model = AnomalyModel(preprocess, backbone, FeatureAdaptor(backbone.taps, **adaptor_kwargs),
                             HEADS.get(head_name)(**hyperparams), batch_size=4)
        model.set_params(device=devices)
        model.fit(dataset, progress=False)
        scored = list(model.score_split(dataset, "test", progress=False))
        for key, value in model.head.state.items():
            arrays[f"{head_name}/{devices}/{key}"] = value
        for key in ("anomaly_score", "anomaly_image"):
            arrays[f"{head_name}/{devices}/{key}"] = np.concatenate([b[key][b["valid"]] for b in scored])
        arrays[f"{head_name}/{devices}/apply"] = np.array(
            [r["anomaly_score"] for r in model.apply([np.full((64, 64, 3), 99, np.uint8)] * 5)])
    try:
        model.set_params(batch_size=6)
    except ConfigError as error:
        errors[head_name] = str(error)

mesh = data_mesh()
rng = np.random.default_rng(0)
queries, bank = rng.normal(size=(50, 16)).astype(np.float32), rng.normal(size=(203, 16)).astype(np.float32)
for k in (1, 5):
    for name, result in (("single", nearest_neighbors(queries, bank, k=k, chunk_size=16)),
                         ("sharded", sharded_nearest_neighbors(queries, bank, mesh, k=k, chunk_size=16))):
        arrays[f"nn/{k}/{name}/distances"], arrays[f"nn/{k}/{name}/indices"] = map(np.asarray, result)
features, valid = rng.normal(2.0, 1.0, size=(8, 10, 6)).astype(np.float32), np.arange(8) < 7
for name, x in (("single", features), ("sharded", shard_batch(mesh, features))):
    arrays[f"moments/{name}"] = np.asarray(covariance(update_moments(init_moments(10, 6), x, valid)))
try:
    shard_batch(mesh, np.zeros((6, 2)))
except InputError as error:
    errors["shard_batch"] = str(error)
np.savez(out, **arrays)
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", FOUR_DEVICES, str(folder / "out.npz"), str(folder / "data")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(np.load(folder / "out.npz")), json.loads(run.stdout.strip().splitlines()[-1])


def test_padim_gaussians_equal_single_device(four_devices):
    arrays, _ = four_devices
    np.testing.assert_allclose(arrays["padim/all/mean"], arrays["padim/cpu:0/mean"], rtol=1e-5, atol=1e-6)
    covariance = {devices: np.linalg.inv(np.swapaxes(w, -1, -2) @ w)  # W (cov + eps I) W^T = I
                  for devices in ("cpu:0", "all") for w in [arrays[f"padim/{devices}/whitening"].astype(np.float64)]}
    # Features of a batch of 1 per device and of 4 on one device differ in the last bits (other
    # convolution blocking); relative to each position's covariance scale they agree to 1e-5.
    scale = np.abs(covariance["cpu:0"]).max(axis=(-2, -1), keepdims=True)
    np.testing.assert_array_less(np.abs(covariance["all"] - covariance["cpu:0"]) / scale, 1e-5)


def test_moments_reduced_across_devices_equal_one_device(four_devices):
    arrays, _ = four_devices
    np.testing.assert_allclose(arrays["moments/sharded"], arrays["moments/single"], rtol=1e-5, atol=1e-6)


# PaDiM's Mahalanobis distance (eps = 0.01) amplifies those last-bit feature differences ~100x.
@pytest.mark.parametrize("head_name, rtol", [("padim", 1e-4), ("patchcore", 1e-5)])
def test_scores_equal_single_device(four_devices, head_name, rtol):
    arrays, _ = four_devices
    for key in ("anomaly_score", "anomaly_image", "apply"):
        np.testing.assert_allclose(arrays[f"{head_name}/all/{key}"], arrays[f"{head_name}/cpu:0/{key}"],
                                   rtol=rtol, atol=1e-5)


def test_patchcore_bank_equals_single_device(four_devices):
    arrays, _ = four_devices
    bank = arrays["patchcore/cpu:0/memory_bank"]
    np.testing.assert_allclose(arrays["patchcore/all/memory_bank"], bank, rtol=0, atol=1e-6 * np.abs(bank).max())


@pytest.mark.parametrize("k", [1, 5])
def test_sharded_nearest_neighbours_equal_single_device(four_devices, k):
    arrays, _ = four_devices
    np.testing.assert_array_equal(arrays[f"nn/{k}/sharded/indices"], arrays[f"nn/{k}/single/indices"])
    np.testing.assert_allclose(arrays[f"nn/{k}/sharded/distances"], arrays[f"nn/{k}/single/distances"],
                               rtol=1e-5, atol=1e-6)


def test_indivisible_batches_are_refused_clearly(four_devices):
    _, errors = four_devices
    assert "multiple of the 4 devices" in errors["padim"]
    assert "6 cannot be split evenly over 4 devices" in errors["shard_batch"]


PADIM_WHITENING_LOOP = r"""
import jax, numpy as np
from anomax.heads.padim import whitening
from anomax.kernels.stats import covariance, init_moments, update_moments
from anomax.parallel import data_mesh, replicate, shard_batch

assert jax.device_count() == 2
mesh, rng = data_mesh(), np.random.default_rng(0)
for _ in range(100):  # a fit's last step, many times: computed on every device, this hung within 100
    moments = update_moments(replicate(mesh, init_moments(256, 64)),
                             shard_batch(mesh, rng.random((8, 256, 64), np.float32)), shard_batch(mesh, np.ones(8, bool)))
    w = whitening(moments, 0.01)
assert w.sharding.device_set == {jax.local_devices()[0]}, w.sharding
w, cov = np.asarray(w, np.float64), np.asarray(covariance(moments), np.float64) + 0.01 * np.eye(64)
np.testing.assert_allclose(w @ cov @ np.swapaxes(w, -1, -2), np.broadcast_to(np.eye(64), cov.shape), atol=1e-3)
print("ok")
"""


def test_padim_whitening_on_several_cpu_devices_finishes():
    """jaxlib's batched CPU Cholesky waits on the thread pool that runs the devices' programs: with
    one copy per device on 2 simulated devices (a pool of 2 threads here) this loop hung in 2 runs of
    2 on a loaded machine; computed on one device it cannot."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    try:
        run = subprocess.run([sys.executable, "-c", PADIM_WHITENING_LOOP], env=env, capture_output=True, text=True,
                             timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("PaDiM's whitening on 2 CPU devices still running after 240 s (deadlocked)")
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr[-3000:]
