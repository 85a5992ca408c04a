"""The package as a user installs it: a wheel (not an editable checkout) carries the configs."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_package_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "anomax").rglob("__init__.py")}
    # conf/ installs as anomax.conf; an unlisted config folder makes setuptools warn at every install
    found |= {".".join(("anomax", *d.relative_to(ROOT).parts)) for d in [ROOT / "conf", *(ROOT / "conf").rglob("*/")]}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory):
    """The wheel built from a copy of this tree's sources, and what the build printed: built in the
    checkout, setuptools reuses its build/ folder, whose stale files (a module since deleted) would ship."""
    import shutil

    work = tmp_path_factory.mktemp("wheel")
    for name in ("anomax", "conf", "pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, work / "source" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, work / "source" / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(work / "dist"),
                            str(work / "source")], check=True, capture_output=True, text=True)
    return next((work / "dist").glob("anomax-*.whl")), build.stdout + build.stderr


@pytest.fixture(scope="module")
def installed_wheel(built_wheel, tmp_path_factory):
    """The wheel installed (without dependencies: the test venv has them) into a folder that is not
    the source tree."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(built_wheel[0])], check=True, capture_output=True)
    return site


def test_the_wheel_builds_without_package_warnings(built_wheel):
    # setuptools names each folder it would ship but was not told about; a user sees one warning per folder
    assert "absent from the `packages` configuration" not in built_wheel[1], built_wheel[1][-3000:]


def test_the_wheel_carries_its_licence(built_wheel):
    """Apache-2.0 section 4(a): the licence text goes with every copy."""
    import zipfile

    with zipfile.ZipFile(built_wheel[0]) as wheel:
        licence = [name for name in wheel.namelist() if name.endswith("dist-info/licenses/LICENSE")]
        assert licence, "the wheel has no LICENSE"
        assert b"Apache License" in wheel.read(licence[0])
        assert "License-File: LICENSE" in wheel.read(next(n for n in wheel.namelist() if n.endswith("METADATA"))).decode()


def test_the_wheel_carries_its_typing_marker_and_one_version(built_wheel):
    """PEP 561's py.typed, so type checkers read anomax's annotations; the version of the metadata is
    the one anomax reports."""
    import zipfile

    import anomax

    with zipfile.ZipFile(built_wheel[0]) as wheel:
        assert "anomax/py.typed" in wheel.namelist()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == anomax.__version__


def test_configs_compose_from_the_installed_wheel(installed_wheel, tmp_path):
    script = """
import anomax, anomax.apps.config as config
from hydra import compose, initialize_config_dir
config.register_schemas()
with initialize_config_dir(config_dir=config.CONF_DIR, version_base="1.3"):
    cfg = compose("anomax_train", overrides=["dataset=synthetic", "model/head=padim"])
print(anomax.__file__)
print(config.CONF_DIR)
print(cfg.dataset.format, cfg.model.head.name, cfg.model.head.eps)
"""
    env = {**os.environ, "PYTHONPATH": str(installed_wheel)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    module_file, conf_dir, composed = result.stdout.strip().splitlines()
    assert Path(module_file).is_relative_to(installed_wheel) and Path(conf_dir) == installed_wheel / "anomax" / "conf"
    assert composed == "synthetic padim 0.01"


def test_the_public_names_resolve_and_are_listed():
    """`import anomax` is lazy: every name of __all__ resolves, and dir() lists them (tab completion)."""
    import anomax

    assert set(anomax.__all__) <= set(dir(anomax))
    for name in anomax.__all__:
        assert getattr(anomax, name) is not None


def test_the_library_leaves_the_root_logger_to_the_application(tmp_path):
    """TFDS and grain log through absl, which configures the root logger when it has no handler: after
    anomax has built, fitted and scored a model, an application's own basicConfig still takes effect."""
    script = f"""
import logging, anomax
cfg = anomax.compose_train_config(["+experiment=synthetic_smoke", "dataset.n_train=4", "dataset.n_test_good=2",
                                   "dataset.n_test_defect=2", "model/head=padim", "cache_dir={tmp_path / 'cache'}"])
model = anomax.build_model(cfg)
from anomax.pipeline import read_configured_dataset
dataset = read_configured_dataset(cfg["dataset"], {{}}, seed=0)
model.fit(dataset, progress=False, cache_dir="{tmp_path / 'cache'}")
list(anomax.results_of(model, dataset, "test", "{tmp_path / 'cache'}", False))
assert logging.getLogger().handlers == [], logging.getLogger().handlers
logging.basicConfig(level=logging.INFO, format="MYAPP %(name)s: %(message)s")
logging.getLogger("anomax").info("a line")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "MYAPP anomax: a line" in done.stderr
