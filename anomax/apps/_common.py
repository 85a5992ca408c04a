"""What every console app shares: composed config -> plain dict, clear errors instead of tracebacks."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from anomax.errors import AnomaxError, ConfigError
from anomax.files import check_run_dir_unused, claim_run_dir

log = logging.getLogger("anomax")


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain containers, every interpolation resolved. A value left ??? (e.g.
    dataset.root of mvtec_ad) or one that does not resolve (an unset ${oc.env:...}) is a
    ConfigError naming its key, before anything reads it as a path."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key} has no value (??? in the config); set it, e.g. "
                          f"{error.full_key}=...") from None
    except InterpolationResolutionError as error:
        reason = error.msg.splitlines()[0]  # the rest repeats the key and the node's type
        raise ConfigError(f"{error.full_key} does not resolve: {reason}") from None


def check_known_keys(config: dict[str, Any], schema: type, app: str) -> None:
    """Hydra's schema refuses a mistyped key, but ``+key=...`` (what Hydra's own message suggests)
    adds it anyway, and the app would silently ignore it."""
    known = {field.name for field in dataclasses.fields(schema)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}: not a setting of {app}; known keys: "
                          f"{', '.join(sorted(known))}")


def load_configured_model(config: dict[str, Any]):
    """The saved model a config names, with its runtime batch size overridden when one is given;
    'runtime' (jax | onnxruntime | openvino, default jax) runs the artifact's model.onnx elsewhere."""
    from anomax.artifact import load_model

    model = load_model(config["model_dir"], runtime=config.get("runtime") or "jax")
    if config["batch_size"] is not None:  # 0 is refused by set_params, not taken for "unset"
        model.set_params(batch_size=config["batch_size"])
    return model


def print_version_if_asked(app: str) -> None:
    """``--version``: anomax's version (Hydra would print its own for a Hydra app)."""
    if "--version" in sys.argv[1:]:
        from anomax import __version__

        print(f"{app} (anomax {__version__})")
        raise SystemExit(0)


class JobFailed(RuntimeError):
    """One job of a sweep failed with an AnomaxError (already reported on its own line)."""


def reports_errors(app: str) -> Callable:
    """An AnomaxError ends the job with one clear line (and exit status 2), not a traceback; in a sweep
    (-m) it fails that job only, and Hydra reports the failures when the sweep ends."""

    def wrap(task: Callable) -> Callable:
        @functools.wraps(task)
        def run(cfg: DictConfig) -> Any:
            # Third-party warnings go to the run's log file (conf/hydra/job_logging), not the console.
            logging.captureWarnings(True)
            try:
                return task(cfg)
            except AnomaxError as error:
                logging.getLogger().error("%s: %s", app, error)  # the log file; the console gets the line below
                print(f"{app}: error: {error}", file=sys.stderr)
                if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                    # an ordinary exception: Hydra marks this job failed and runs the others (a search counts
                    # it against max_failure_rate); SystemExit would end the whole sweep here
                    raise JobFailed(f"{app}: {error}") from None
                if _joined_other_processes():
                    # JAX's exit handler would wait in its shutdown barrier (shutdown_timeout_s) while the other
                    # processes wait in a collective; leaving now stops this process's heartbeats, so they stop
                    # within heartbeat_timeout_s
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(2)
                raise SystemExit(2) from None

        return run

    return wrap


def _joined_other_processes() -> bool:
    """Whether this process joined others (asked without starting JAX's backends, e.g. a GPU's)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized()


class RefuseUsedRunDir(Callback):
    """Hydra writes .hydra/ into a job's directory before the task runs; a rerun into a used
    directory would overwrite the earlier run's config record before the run could refuse it, and
    two runs started in the same second (one default directory) would write into each other's.
    So a single run claims its directory here, before Hydra writes into it, and holds it to the end
    (the task's own claim_run_dir finds it held). Processes of one distributed run share nothing
    here: only process 0 claims its directory."""

    def __init__(self, app: str):
        self.app = app
        self._held = contextlib.ExitStack()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        distributed = config.get("distributed", {})
        # process 0 of a manual run is known now; under 'auto' only JAX's detection will tell
        if distributed.get("mode", "off") == "off" or (distributed.get("mode") == "manual"
                                                       and distributed.get("process_id") == 0):
            claim = claim_run_dir(config.hydra.run.dir, for_the_task=True)
            self._refusing(lambda: self._held.enter_context(claim))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._held.close()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        for job in sorted(sweep.iterdir()) if sweep.is_dir() else ():
            if job.is_dir():
                self._refusing(lambda: check_run_dir_unused(job, "hydra.sweep.dir"))

    def _refusing(self, claim: Callable[[], Any]) -> None:
        try:
            claim()
        except AnomaxError as error:
            print(f"{self.app}: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
