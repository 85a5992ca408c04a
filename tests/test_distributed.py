"""Multi-process runs on JAX's distributed runtime, on this host: 2 processes x 2 simulated CPU
devices (coordinator on 127.0.0.1) against 1 process on 1 device, on the synthetic set.

The workers are fresh python processes (XLA_FLAGS and jax.distributed.initialize must come before
any JAX use). Each runs the whole workflow (train_and_evaluate) for PaDiM, PatchCore, the student
and EfficientAD and records the test scores it computed (and the trained heads' fitted state);
process 0 writes the outputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomax.apps.config import CONF_DIR
from anomax.data.dataset import read_dataset
from anomax.distributed import DistributedConfig, part
from anomax.errors import ConfigError

# 15 training images: the two processes' parts differ in size (8 + 7), as they will on real data
DATASET = {"size": 64, "n_train": 15, "n_test_good": 8, "n_test_defect": 8, "validation_from_train": 0.0,
           "validation_from_test": 0.5}
HEADS = {"padim": [], "patchcore": ["model.head.coreset_ratio=0.1", "model.head.num_neighbors=3"],
         "student": ["train.max_num_epochs=2"],
         # tiny networks; 5 distillation images ({distill}) split 3 + 2 over the processes
         "efficientad": ["train.max_num_epochs=2", "model.head.width=2", "model.head.ae_width=2", "model.head.latent=4",
                         "model.head.distill_epochs=2", "model.head.distill_images={distill}"]}
TRAINED = ("student", "efficientad")  # every process holds the whole fitted state
# PaDiM: 15 samples of 32 dims per position make its whitening ill-conditioned, and it amplifies the
# float32 rounding of the moments reduced over two processes into the scores (measured 1.03e-5 relative
# apart when this test was written, 2.11e-5 with jax 0.10.2; the covariances agree to 1e-5, checked below)
PADIM_RTOL = 5e-5

WORKER = r"""
import faulthandler, hashlib, json, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)  # finish() asks for the stacks of a hung worker
import numpy as np
from hydra import compose, initialize_config_dir
from anomax import distributed, pipeline
from anomax.apps._common import plain
from anomax.apps.config import register_schemas
from anomax.model import AnomalyModel

conf_dir, out, root, port, process, processes, heads, distill, dataset, trained = sys.argv[1:11]
process, processes, heads, trained = int(process), int(processes), json.loads(heads), trained.split(",")
overrides = ["+experiment=synthetic_smoke", f"dataset.root={root}", "progress=false"]
overrides += [f"dataset.{key}={value}" for key, value in json.loads(dataset).items()]
if processes > 1:
    overrides += ["distributed=manual", f"distributed.coordinator_address=127.0.0.1:{port}",
                  f"distributed.num_processes={processes}", f"distributed.process_id={process}",
                  "distributed.initialization_timeout_s=60"]  # heartbeats: the default 100 s, for a loaded machine
register_schemas()
with initialize_config_dir(conf_dir, version_base="1.3"):
    configs = {head: plain(compose("anomax_train", overrides=overrides + [f"model/head={head}",
                                                                           *[e.format(distill=distill) for e in extra]]))
               for head, extra in heads.items()}
distributed.initialize(next(iter(configs.values()))["distributed"])

scores = {}
results_of = pipeline.results_of
def recorded(model, dataset, split, *args, **kwargs):  # the test scores this process computed
    for batch in results_of(model, dataset, split, *args, **kwargs):
        if split == "test":
            valid = batch["valid"]
            scores.setdefault(model.head.name, []).append(np.stack([batch["index"][valid],
                                                                    batch["anomaly_score"][valid]], 1))
        yield batch
pipeline.results_of = recorded

digests = {}
fit = AnomalyModel.fit
def fitted(model, *args, **kwargs):  # a digest of the head state this process holds after fit
    info = fit(model, *args, **kwargs)
    if model.head.name in trained:
        digest = hashlib.sha256()
        for key in sorted(model.head.state):
            digest.update(key.encode() + np.ascontiguousarray(model.head.state[key]).tobytes())
        digests[model.head.name] = digest.hexdigest()
    return info
AnomalyModel.fit = fitted

for head, cfg in configs.items():
    pipeline.train_and_evaluate(cfg, f"{out}/run_p{process}/{head}")
np.savez(f"{out}/scores_p{process}.npz", **{head: np.concatenate(rows) for head, rows in scores.items()})
with open(f"{out}/digests_p{process}.json", "w") as file:
    json.dump(digests, file)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(devices: int, worker: str) -> dict[str, str]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    # Each concurrent worker its own compilation cache: JAX writes an entry in place, not atomically,
    # and two processes compiling the same program could read each other's half-written entries.
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(env["JAX_COMPILATION_CACHE_DIR"], f"test_distributed_{worker}")
    return env


def start(script: list[str], devices: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *script], env=environment(devices, log.stem), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> None:
    """Wait for every worker; those still running ``timeout`` s after the wait began are asked for
    their Python stacks (SIGUSR1, see WORKER) and killed, and the failure shows every log."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
        hung = [(proc, log) for proc, log in zip(procs, logs) if proc.poll() is None]
        for proc, _ in hung:
            proc.send_signal(signal.SIGUSR1)
        if hung:
            time.sleep(5)  # the stacks reach the logs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    if hung:
        pytest.fail(f"{', '.join(log.name for _, log in hung)} still running after {timeout:.0f} s:\n"
                    + "\n".join(f"--- {log.name} ---\n{log.read_text()[-6000:]}" for log in logs))
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{log.name} failed ({proc.returncode}):\n{log.read_text()[-4000:]}"


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process on one device, and two processes on two devices each, on the same data."""
    tmp = tmp_path_factory.mktemp("distributed")
    root = tmp / "data"
    read_dataset("synthetic", root=str(root), **DATASET)  # generated once, before the workers read it
    distill = tmp / "distill"
    distill.mkdir()
    for i in range(5):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), np.uint8)).save(distill / f"{i}.png")
    args = [json.dumps(HEADS), str(distill), json.dumps(DATASET), ",".join(TRAINED)]
    port = free_port()
    single, multi = tmp / "single", tmp / "multi"
    logs = [tmp / "single.log", tmp / "multi_p0.log", tmp / "multi_p1.log"]
    procs = [start(["-c", WORKER, CONF_DIR, str(single), str(root), "0", "0", "1", *args], 1, logs[0])]
    procs += [start(["-c", WORKER, CONF_DIR, str(multi), str(root), str(port), str(p), "2", *args], 2, log)
              for p, log in zip((0, 1), logs[1:])]
    # A guard against a hang, not a speed check: cold compiles of four heads in three processes
    # sharing two busy cores took over 300 s here
    finish(procs, logs, timeout=900)
    return single, multi


def test_partition_is_disjoint_ordered_and_balanced():
    for count in (0, 1, 7, 16):
        parts = [part(count, p, 3) for p in range(3)]
        assert [i for s in parts for i in range(count)[s]] == list(range(count))
        assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


def test_config_is_checked():
    assert DistributedConfig().mode == "off"
    with pytest.raises(ConfigError, match="distributed.coordinator_address"):
        DistributedConfig(mode="manual", num_processes=2, process_id=0)
    with pytest.raises(ConfigError, match="distributed.process_id"):
        DistributedConfig(mode="manual", coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match="host:port"):
        DistributedConfig(mode="manual", coordinator_address="127.0.0.1", num_processes=2, process_id=0)
    # distributed=manual forgotten: each host would have trained alone on everything, as process 0
    with pytest.raises(ConfigError, match="distributed.coordinator_address .* distributed.mode = 'off'.* distributed=manual"):
        DistributedConfig(coordinator_address="10.0.0.1:12355", num_processes=2, process_id=1)


def test_two_processes_match_one_device(runs):
    from anomax.artifact import load_model

    single, multi = runs
    for head in HEADS:
        one = json.loads((single / "run_p0" / head / "metrics.json").read_text())
        two = json.loads((multi / "run_p0" / head / "metrics.json").read_text())
        assert two["splits"] == one["splits"]
        assert two["fit"].get("num_images") == one["fit"].get("num_images") == (None if head in TRAINED else 15)
        for key in ("auroc", "aupr", "f1_max"):  # image metrics: the same scores rank the same
            assert two["metrics"]["image"][key] == one["metrics"]["image"][key], (head, key)
        for key in ("auroc", "aupro"):  # pixel metrics: maps within float32 rounding
            # PaDiM: 15 samples of 32 dims per position make its whitening ill-conditioned (measured 8e-5
            # relative apart, its covariances 1.1e-5, within the check below); AUPRO moved by 2e-5
            assert two["metrics"]["pixel"][key] == pytest.approx(one["metrics"]["pixel"][key],
                                                                 abs=1e-4 if head == "padim" else 1e-5)
        for key in ("segmentation", "largest_good", "smallest_defect", "intermediate"):  # from those scores
            assert two["thresholds"][key] == pytest.approx(one["thresholds"][key],
                                                           rel=PADIM_RTOL if head == "padim" else 1e-5)

        # test scores computed by each process (every process sees all of them) against one device
        reference = np.load(single / "scores_p0.npz")[head]
        reference = reference[np.argsort(reference[:, 0])]
        for process in (0, 1):
            scores = np.load(multi / f"scores_p{process}.npz")[head]
            scores = scores[np.argsort(scores[:, 0])]
            np.testing.assert_array_equal(scores[:, 0], reference[:, 0])
            # PaDiM: PADIM_RTOL (test_parallel allows 1e-4 for 4 devices of one process).
            # EfficientAD's scores cross 0 (its validation 0.9 quantile), where relative error means nothing;
            # its maps are normalised so that the 0.9..0.995 quantile span is 0.1, and atol 1e-5 is 1e-4 of
            # that span (measured: 1.4e-7 apart at most after two data-parallel epochs per phase).
            np.testing.assert_allclose(scores[:, 1], reference[:, 1], rtol=PADIM_RTOL if head == "padim" else 1e-5,
                                       atol=1e-5)
            if head in TRAINED:  # every process holds the same state: the one process 0 saved
                digest = json.loads((multi / f"digests_p{process}.json").read_text())[head]
                assert digest == _digest(load_model(multi / "run_p0" / head / "model").head.state), (head, process)

        # the artifact of the 2-process run loads and applies here, on one process and one device
        models = [load_model(run / "run_p0" / head / "model") for run in (single, multi)]
        state = [m.head.state for m in models]
        if head == "patchcore":
            assert two["fit"]["coreset_indices"] == one["fit"]["coreset_indices"]
            assert len(one["fit"]["coreset_indices"]) == one["fit"]["coreset_size"] == 96  # 10 % of 15 x 64 patches
            np.testing.assert_allclose(state[1]["memory_bank"], state[0]["memory_bank"], rtol=1e-5, atol=1e-5)
        elif head in TRAINED:  # data-parallel training: the same epochs, gradients summed over processes
            np.testing.assert_allclose(_epoch_errors(two["fit"]), _epoch_errors(one["fit"]), rtol=1e-5)
            if head == "efficientad":  # every process's images: 15 training + 5 distillation, 4 validation
                assert two["fit"]["num_train_images"] == 15 and two["fit"]["distillation"]["num_images"] == 20
                assert two["fit"]["quantiles_from"] == one["fit"]["quantiles_from"] == "4 validation images"
                for key in ("quantiles_local", "quantiles_global"):  # measured: 2.4e-7 relative apart at most
                    np.testing.assert_allclose(state[1][key], state[0][key], rtol=1e-5)
        else:
            np.testing.assert_allclose(state[1]["mean"], state[0]["mean"], rtol=1e-5, atol=1e-5)
            # cov + eps I = (W^T W)^-1, rebuilt in float64 (measured: 9.1e-6 apart at most, entries up to 15.7)
            covariance = [np.linalg.inv(np.einsum("hwji,hwjk->hwik", *[s["whitening"].astype(np.float64)] * 2))
                          for s in state]
            np.testing.assert_allclose(covariance[1], covariance[0], rtol=1e-5, atol=1e-5)
        images = [np.full((64, 64, 3), 90, np.uint8), np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)]
        applied = [[r["anomaly_score"] for r in m.apply(images)] for m in models]
        np.testing.assert_allclose(applied[1], applied[0], rtol=PADIM_RTOL if head == "padim" else 1e-5, atol=1e-5)


def _epoch_errors(fit) -> list[float]:
    """The training error of each epoch; efficientad's teacher distillation epochs after them."""
    return [epoch["error"] for epoch in fit["log"] + fit.get("distillation", {}).get("log", [])]


def _digest(state) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + np.ascontiguousarray(state[key]).tobytes())
    return digest.hexdigest()


def test_only_process_zero_writes_outputs(runs):
    _, multi = runs
    for head in HEADS:
        written = files_under(multi / "run_p0" / head)
        assert {"dataset.json", "metrics.json", "index.html", "model/model.json"} <= set(written)
        assert any(name.startswith("pictures/") for name in written)
        assert files_under(multi / "run_p1" / head) == []


APP = "import sys; from anomax.apps.train import main; sys.argv[0] = 'anomax-train'; main()"


def two_app_processes(tmp_path: Path, settings: list[str], own=lambda process: []):
    """anomax-train as processes 0 and 1 of one manual run on the synthetic set, 2 devices each, run
    directories run_p0 and run_p1; ``own(process)``: that process's further overrides.
    Returns (processes, their logs, the overrides they share)."""
    root = tmp_path / "data"
    read_dataset("synthetic", root=str(root), **DATASET)
    common = ["+experiment=synthetic_smoke", f"dataset.root={root}", "progress=false", "distributed=manual",
              f"distributed.coordinator_address=127.0.0.1:{free_port()}", "distributed.num_processes=2",
              "distributed.initialization_timeout_s=60", *settings]
    logs = [tmp_path / f"p{p}.log" for p in (0, 1)]
    procs = [start(["-c", APP, *common, f"distributed.process_id={p}", *own(p), f"hydra.run.dir={tmp_path}/run_p{p}"],
                   2, log) for p, log in zip((0, 1), logs)]
    return procs, logs, common


def test_a_killed_process_stops_the_other_with_an_error(tmp_path):
    """Process 1 is killed mid-run: process 0 exits with JAX's error within the heartbeat timeout,
    and no artifact (complete or half-written) is left."""
    procs, logs, _ = two_app_processes(tmp_path, ["model/head=patchcore", "distributed.heartbeat_timeout_s=5"])
    try:
        deadline = time.monotonic() + 240
        # mid-run: once process 1 has read the dataset and started fitting
        while "dataset synthetic_brick" not in _text(tmp_path / "run_p1" / "train.log"):
            assert procs[1].poll() is None and time.monotonic() < deadline, logs[1].read_text()[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=90)  # heartbeat 5 s; generous for a busy machine
        stopped = time.monotonic() - killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    output = logs[0].read_text()
    assert procs[0].returncode != 0, output[-3000:]
    assert "another task died" in output or "unhealthy" in output, output[-3000:]
    assert not (tmp_path / "run_p0" / "model").exists() and not (tmp_path / "run_p0" / "metrics.json").exists()
    assert not [p for p in (tmp_path / "run_p0").iterdir() if p.name.startswith("model")]
    print(f"process 0 stopped {stopped:.1f} s after process 1 was killed")


def test_processes_that_do_not_run_the_same_job_are_refused_and_stop_at_once(tmp_path):
    """Process 1 given another seed trained on another split, without an error. Both now name what
    differs and leave with status 2 at once: JAX's exit handler would have waited in its shutdown
    barrier (shutdown_timeout_s, 120 s here) while the other process waited in a collective. Process
    0's used run directory is refused before Hydra rewrites its record."""
    procs, logs, common = two_app_processes(tmp_path, ["model/head=padim", "distributed.shutdown_timeout_s=120"],
                                            lambda process: [f"seed={process}"])
    try:
        for proc in procs:
            proc.wait(timeout=100)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs):
        output = log.read_text()
        assert proc.returncode == 2, output[-3000:]
        assert ("the processes do not run the same job: process 1 differs from process 0 in model, seed, "
                "the test split's images, the validation split's images, train;") in output, output[-3000:]
    assert not (tmp_path / "run_p0" / "model").exists() and not (tmp_path / "run_p0" / "dataset.json").exists()
    (tmp_path / "run_p0" / "metrics.json").write_text("{}")  # as a finished run leaves it
    record = (tmp_path / "run_p0" / ".hydra" / "overrides.yaml").read_text()
    done = subprocess.run([sys.executable, "-c", APP, *common, "distributed.process_id=0", "seed=0",
                           f"hydra.run.dir={tmp_path}/run_p0"], env=environment(2, "again"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "already holds metrics.json" in done.stderr, done.stderr[-3000:]
    assert (tmp_path / "run_p0" / ".hydra" / "overrides.yaml").read_text() == record


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


SHARDED_CORESET = r"""
import sys
import jax, numpy as np
from anomax import parallel
from anomax.kernels.coreset import greedy_coreset, sharded_greedy_coreset
from anomax.parallel import data_mesh

assert jax.device_count() == 4
# XLA:CPU's in-process rendezvous can deadlock with several collective programs in flight
assert parallel._one_program_at_a_time()
rng = np.random.default_rng(0)
# Integer-valued rows with many exact duplicates: distances tie exactly, across device boundaries too.
rows = rng.integers(0, 3, (203, 5)).astype(np.float32)
for size, start in ((40, 0), (60, 202), (203, 17)):
    expected = np.asarray(greedy_coreset(rows, size, start))
    found = sharded_greedy_coreset(rows, size, start, data_mesh())
    assert found.tolist() == expected.tolist(), (size, start, found, expected)
print("ok")
"""


def test_sharded_coreset_takes_the_same_rows_with_ties():
    """The sharded greedy coreset (one process, 4 devices, padded blocks) picks the same indices as
    the single-device one, ties going to the lowest global index."""
    done = subprocess.run([sys.executable, "-c", SHARDED_CORESET], env=environment(4, "coreset"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr


COLLECTIVE_LOOP = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from anomax import distributed, parallel

process, port = int(sys.argv[1]), sys.argv[2]
distributed.initialize({"mode": "manual", "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
                        "process_id": process, "initialization_timeout_s": 60})
mesh = parallel.data_mesh()
rows = parallel.shard_batch(mesh, np.full((4, 8), process + 1, np.float32))  # 2 rows per device


def gathered(*args, **kwargs):
    raise AssertionError("replicate ran jax.device_put's cross-process check: a collective per leaf")


multihost_utils.assert_equal = gathered
total = parallel.replicate(mesh, np.zeros((8, 8), np.float32))
accumulate = parallel.jit(lambda total, rows: total + rows.T @ rows)  # an all-reduce over 4 devices
for _ in range(300):  # dispatched back to back: the pattern of PaDiM's moments over batches
    total = accumulate(total, rows)
assert np.allclose(np.asarray(total.addressable_data(0)), 300 * (4 * 1 + 4 * 4)), total
print("ok")
"""


def test_back_to_back_collective_programs_finish():
    """XLA's gloo collectives deadlock with several programs in flight on several CPU devices per
    process (this loop with plain jax.jit hung in 6 runs of 6); parallel.jit runs them one at a time,
    and parallel.replicate places host values with no collective at all."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", COLLECTIVE_LOOP, str(p), str(port)], env=environment(2, f"loop_p{p}"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0 and "ok" in output, output[-3000:]


def test_check_model_refuses_an_ensemble_a_single_process_head_and_tiling(monkeypatch):
    """Across processes, what does not run there yet is refused before any work, by name."""
    import dataclasses

    import tiny_models
    from anomax import distributed
    from anomax.ensemble import ScoreEnsemble

    model = tiny_models.fitted_model("resnet18", "padim", {}, {}, size=32)
    distributed.check_model(ScoreEnsemble([model, model]))  # one process: nothing to refuse
    monkeypatch.setattr(distributed, "is_multi_process", lambda: True)
    distributed.check_model(model)
    with pytest.raises(ConfigError, match="score ensemble"):
        distributed.check_model(ScoreEnsemble([model, model]))
    model.tiling = dataclasses.replace(model.tiling, tile_size=16)
    with pytest.raises(ConfigError, match="tiling"):
        distributed.check_model(model)
    monkeypatch.setattr(type(model.head), "multi_process", False)  # a head that declares it cannot yet
    with pytest.raises(ConfigError, match="'padim' does not run on several processes"):
        distributed.check_model(model)
