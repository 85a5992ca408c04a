"""Every setting of every config group: a wrong value fails at composition, naming its key.

Values are set the way a user does, as command-line overrides composed by Hydra; the composed
config is then validated (anomax-train does that before it reads any weights or images).
"""
import dataclasses
import typing

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from anomax.apps.config import CONF_DIR, MAX_RUN_NAME, register_schemas, run_dir_suffix
from anomax.errors import ConfigError
from anomax.evaluation.config import EvaluateConfig
from anomax.features import AdaptorConfig
from anomax.augment import AugmentConfig
from anomax.distributed import DistributedConfig
from anomax.ensemble import EnsembleConfig
from anomax.pipeline import ExportConfig, RunConfig, SplitConfig, validate_config
from anomax.tiling import TilingConfig
from anomax.preprocess.params import PreprocessParams
from anomax.registry import HEADS
from anomax.training import TrainConfig

ANY_STRING_IS_VALID = {"cache_dir", "distill_images"}  # paths, checked where they are read


def wrong_values(cls):
    """(field, override value) pairs that must be refused: wrong type, out of range, unknown choice."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        annotation, name = hints[field.name], field.name
        if name in ANY_STRING_IS_VALID:
            continue
        options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        if typing.get_origin(annotation) is typing.Literal or any(typing.get_origin(o) is typing.Literal
                                                                   for o in options):
            yield name, "not_a_choice"
            continue
        yield name, "true" if options[0] in (int, float) else "{a: 1}" if options[0] is bool else "'@x'"
        bounds = field.metadata.get("bounds", {})
        for rule, limit in bounds.items():
            step = 1 if options[0] is int else 0.5
            yield name, {"ge": limit - step, "gt": limit, "le": limit + step, "lt": limit}[rule]
        if field.metadata.get("odd"):
            yield name, 2


GROUPS = [("", RunConfig, []), ("split.", SplitConfig, []), ("export.", ExportConfig, []),
          ("train.", TrainConfig, []), ("evaluate.", EvaluateConfig, []), ("preprocess.", PreprocessParams, []),
          ("model.head.adaptor.", AdaptorConfig, []), ("augment.", AugmentConfig, []),
          ("tiling.", TilingConfig, ["tiling=default"]), ("distributed.", DistributedConfig, ["distributed=manual"]),
          ("ensemble.", EnsembleConfig, [])]
MANUAL = {"coordinator_address": "127.0.0.1:12355", "num_processes": 2, "process_id": 0}  # a complete manual setup
GROUPS += [("model.head.", HEADS.get(name).Config, [f"model/head={name}"]) for name in HEADS.names()]
CASES = [pytest.param(prefix, name, value, extra + ([f"distributed.{k}={v}" for k, v in MANUAL.items() if k != name]
                                                    if cls is DistributedConfig else []),
                      id=f"{prefix}{name}={value}{'@' + extra[0] if extra else ''}")
         for prefix, cls, extra in GROUPS for name, value in wrong_values(cls)]


@pytest.fixture(scope="module", autouse=True)
def schemas():
    register_schemas()


def composed(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("anomax_train", overrides=["dataset=synthetic", *overrides])


def validated(*overrides):
    """validate_config on the composed config, as anomax-train runs it."""
    from omegaconf import OmegaConf

    return validate_config(OmegaConf.to_container(composed(*overrides), resolve=True))


@pytest.mark.parametrize("prefix, name, value, extra", CASES)
def test_a_wrong_value_fails_at_composition_naming_the_key(prefix, name, value, extra):
    from omegaconf import OmegaConf

    with pytest.raises((ConfigError, HydraException, OmegaConfBaseException)) as failure:
        validate_config(OmegaConf.to_container(composed(*extra, f"{prefix}{name}={value}"), resolve=True))
    assert name in str(failure.value)


def test_every_group_has_cases_and_the_defaults_validate():
    from omegaconf import OmegaConf

    assert len(CASES) > 60
    for name in HEADS.names():
        validate_config(OmegaConf.to_container(composed(f"model/head={name}"), resolve=True))


def test_a_range_normalisation_for_a_mean_std_backbone_needs_its_range():
    """MobileNetV2 was trained on ImageNet mean/std inputs: all_channels alone would feed it HALCON's
    default range [-127, 128]. EfficientNet-Lite brings its own range, so there it needs nothing more."""
    for normalisation in ("all_channels", "first_channel", "none"):
        with pytest.raises(ConfigError, match=f"normalization_type={normalisation}: backbone mobilenet_v2 .* "
                                              "preprocess.range_min and preprocess.range_max"):
            validated("model/backbone=mobilenet_v2", f"preprocess.normalization_type={normalisation}")
    validated("model/backbone=mobilenet_v2", "preprocess.normalization_type=all_channels",
              "preprocess.range_min=-2.0", "preprocess.range_max=2.4")
    validated("model/backbone=efficientnet_lite2", "preprocess.normalization_type=all_channels")


def test_preprocess_is_checked_as_the_backbone_fills_it():
    """A stretch_percentile needs a per-image stretch; left null, the normalisation is the backbone's
    (MobileNetV2: constant_values, Lite2: none), and the error names that one, before any file is read."""
    for backbone, normalisation in (("mobilenet_v2", "constant_values"), ("efficientnet_lite2", "none")):
        with pytest.raises(ConfigError, match=rf"preprocess.stretch_percentile .* normalization_type={normalisation}"):
            validated(f"model/backbone={backbone}", "preprocess.stretch_percentile=1")
    validated("model/backbone=efficientnet_lite2", "preprocess.normalization_type=all_channels",
              "preprocess.stretch_percentile=1")


def test_bools_are_not_numbers_and_unknown_keys_are_named():
    for override in ("model.head.coreset_ratio=true", "model.head.sigma=false"):
        with pytest.raises((ConfigError, HydraException, OmegaConfBaseException), match=override.split("=")[0][11:]):
            from omegaconf import OmegaConf

            validate_config(OmegaConf.to_container(composed(override), resolve=True))
    with pytest.raises(HydraException, match="coreset_ratoi"):
        composed("model.head.coreset_ratoi=0.1")


@pytest.mark.parametrize("override, named", [
    ("+batchsize=2", r"unknown key\(s\) batchsize: not a setting of anomax-train; known top-level keys: .*batch_size"),
    ("+model.heads=x", r"unknown key\(s\) model.heads: .*known model keys: backbone, head"),
    ("+model.backbone.widht_multiplier=0.5", r"unknown key\(s\) model.backbone.widht_multiplier: .*width_multiplier"),
])
def test_a_key_added_with_plus_is_refused_unless_it_is_a_setting(override, named):
    """Hydra suggests `+key=...` for a key its schema refuses; the run must not then ignore it."""
    with pytest.raises(ConfigError, match=named):
        validated(override)


def test_run_directory_names_stay_short_and_usable():
    assert run_dir_suffix(["model/head=padim", "seed=1"]) == "_head-padim__seed-1"
    long = ["dataset=mvtec_ad", "dataset.root=/a/very/long/path/" + "x" * 300, "dataset.category=c0",
            "dataset.validation_from_train=0.0", "model/head=patchcore", "model.head.coreset_ratio=0.001",
            "preprocess.width=128", "preprocess.height=128", "+experiment=elpv_protocol"]
    suffix = run_dir_suffix(long)
    assert "root" not in suffix and "/" not in suffix and len(suffix) <= MAX_RUN_NAME + 1
    many = [f"model.head.adaptor.taps=[features.{i},features.{i + 1}]" for i in range(20)]
    hashed = run_dir_suffix(many)
    assert hashed.startswith("_overrides-") and len(hashed) < 30 and hashed == run_dir_suffix(many)
    assert run_dir_suffix([]) == ""


def test_a_dataset_config_without_its_schema_is_named(tmp_path):
    """A user's dataset YAML without `defaults: [schema_<format>]` ended in KeyError: 'format'; with a format
    and a typo, the message listed accepted keys as refused."""
    from anomax.pipeline import read_configured_dataset

    with pytest.raises(ConfigError, match=r"dataset config 'bad3' has no 'format'; .*schema_<format>"):
        read_configured_dataset({"name": "bad3", "texture": "gravel", "seed": 0}, {}, seed=0)
    with pytest.raises(ConfigError, match=r"does not accept \['textur'\]"):
        read_configured_dataset({"format": "synthetic", "textur": "gravel", "seed": 0, "root": str(tmp_path)}, {},
                                seed=0)


def test_a_wrong_top_level_seed_is_named_itself_not_a_key_interpolating_it():
    with pytest.raises(ConfigError) as failure:
        validated("seed=-1")
    assert str(failure.value).startswith("seed = -1 is invalid"), str(failure.value)


def test_a_seed_beyond_32_bits_and_a_sigma_the_maps_cannot_take_are_refused():
    """Seed 2**32 was seed 0 again (a sweep's runs silently repeated), 2**64 an OverflowError; a sigma
    whose Gaussian is wider than the maps failed when the first map was drawn, after the fit."""
    for key in ("seed", "train.seed", "model.head.adaptor.seed"):
        with pytest.raises(ConfigError, match=rf"{key} = 4294967296 is invalid"):
            validated(f"{key}={2**32}")
    validated(f"seed={2**32 - 3}")
    with pytest.raises(ConfigError, match=r"model.head.sigma = 8.0: its Gaussian's radius, 32 pixels, .* the model "
                                          r"inputs are 32 pixels"):
        validated("model/head=padim", "model.head.sigma=8", "preprocess.height=32", "preprocess.width=32")
    with pytest.raises(ConfigError, match=r"model.head.sigma = 1000000000.0: .*tiles are 64 pixels"):
        validated("model.head.sigma=1e9", "tiling=default", "tiling.tile_size=64", "tiling.stride=64")
    validated("model/head=padim", "model.head.sigma=7.8", "preprocess.height=32", "preprocess.width=32")


@pytest.mark.parametrize("override, named", [
    ("model.backbone.seed=-1", "model.backbone.seed must be an integer >= 0"),
    ("model.backbone.width_multiplier=0", "model.backbone.width_multiplier must be a number > 0"),
    ("dataset.n_train=0", "dataset.n_train must be an integer >= 1"),
    ("dataset.n_test_defect=-2", "dataset.n_test_defect must be an integer >= 0"),
])
def test_backbone_and_synthetic_arguments_are_bounded(override, named, tmp_path):
    """Plain function arguments, not Settings: checked where they are used, before any weights or images."""
    from omegaconf import OmegaConf

    from anomax.pipeline import build_model, read_configured_dataset

    cfg = OmegaConf.to_container(composed("+experiment=synthetic_smoke", f"dataset.root={tmp_path}", override),
                                 resolve=True)
    with pytest.raises(ConfigError, match=named):
        build_model(cfg) if override.startswith("model") else read_configured_dataset(cfg["dataset"], {}, seed=0)
    assert not any(tmp_path.iterdir())  # no half-generated dataset left to be read again


@pytest.mark.filterwarnings("ignore::hydra.errors.Hydra14MigrationWarning")  # the host application chose 1.1
def test_compose_train_config_checks_what_it_composes_and_works_inside_another_hydra(tmp_path):
    """The library path of the README: a misspelt key or option is a ConfigError naming it (build_model
    ignored unknown keys), as in anomax-train; an application's own Hydra is kept as it was."""
    import anomax

    for overrides, named in ((["+batchsize=2"], r"unknown key\(s\) batchsize"),
                             (["+model.backbone.widht_multiplier=0.5"], "model.backbone.widht_multiplier"),
                             (["dataset=synthetic", "+dataset.n_trian=3"], r"unknown key\(s\) dataset.n_trian"),
                             (["model/head=nope"], "Could not find 'model/head/nope'"),
                             ("model/head=padim", "takes a list of overrides")):
        with pytest.raises(ConfigError, match=named):
            anomax.compose_train_config(overrides)
    (tmp_path / "mine.yaml").write_text("x: 1\n")
    from hydra.core.utils import JobRuntime
    from hydra.version import getbase

    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.1", job_name="myapp"):
        before = getbase(), JobRuntime.instance().get("name")
        assert anomax.compose_train_config(["model/head=padim"])["model"]["head"]["name"] == "padim"
        assert compose("mine").x == 1  # the application's Hydra is back, with its version base and job name
        assert (getbase(), JobRuntime.instance().get("name")) == before


def test_a_map_border_under_tiling_fails_at_composition():
    """Before any image is read (the fit refuses it too, for the API)."""
    with pytest.raises(ConfigError, match="model.head.border = 1 needs tiling off"):
        validated("model/head=efficientad", "model.head.border=1", "tiling=default")
    validated("model/head=efficientad", "model.head.border=0", "tiling=default")


def test_a_preprocess_size_the_backbone_cannot_take_fails_at_composition():
    """It failed on the first forward pass, after the dataset was read and cached, without naming the key.
    Tiled, the image keeps its own size (tile_size is checked instead)."""
    with pytest.raises(ConfigError, match=r"preprocess.width = 250: backbone 'resnet18' .* multiples of 32; choose e.g. 256"):
        validated("model/backbone=resnet18", "preprocess.width=250")
    with pytest.raises(ConfigError, match=r"preprocess.height = 256: backbone 'vit_small_patch14' .* multiples of 14"):
        validated("model/backbone=vit_small_patch14")
    with pytest.raises(ConfigError, match=r"backbone 'concat' .* multiples of 32"):
        validated("model/backbone=concat_lite2_mobilenet_v2", "preprocess.height=240")
    validated("model/backbone=vit_small_patch14", "preprocess.width=224", "preprocess.height=252")
    validated("model/backbone=resnet18", "preprocess.width=250", "tiling=default")


def test_settings_a_run_does_not_use_are_warned_of(tmp_path, caplog):
    """split.* on a dataset with its own split, train.* on a head fitted in one pass: said, not ignored;
    split.* on a folder, which it splits, is not warned of."""
    import anomax
    from anomax.data.synthetic import make_synthetic_dataset
    from anomax.pipeline import read_configured_dataset, warn_of_unused_settings

    make_synthetic_dataset(tmp_path / "parts", n_train=2, n_test_good=4, n_test_defect=4, size=32)
    small = ["+experiment=synthetic_smoke", "dataset.n_train=4", "dataset.n_test_good=2", "dataset.n_test_defect=2"]
    folder = ["dataset=folder", f"dataset.image_dir={tmp_path / 'parts' / 'brick' / 'test'}"]
    said_of_split = "split percentages {'training_percent': 50.0, 'validation_percent': 15.0} are not used: the "
    for overrides, said in ((["split.training_percent=50"], said_of_split),
                            (folder + ["split.training_percent=50"], None),
                            (["train.max_num_epochs=3"], "train.* {'max_num_epochs': 3} is not used: model.head="),
                            (["model/head=student", "train.max_num_epochs=3"], None),
                            ([], None)):
        cfg = anomax.compose_train_config(["+experiment=synthetic_smoke", *overrides] if overrides[:1] == folder[:1]
                                          else [*small, *overrides])
        caplog.clear()
        with caplog.at_level("WARNING", logger="anomax"):
            read_configured_dataset(cfg["dataset"], cfg["split"], cfg["seed"])
            warn_of_unused_settings(cfg, validate_config(cfg))
        assert [r.getMessage()[:len(said)] for r in caplog.records] == ([said] if said else []), overrides
