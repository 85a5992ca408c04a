"""Small fitted models for tests: a narrow random-init backbone, a head fitted on random images."""
import numpy as np

from anomax.backbones import backbone_requirements, build_backbone
from anomax.ensemble import ConcatBackbone
from anomax.features import FeatureAdaptor
from anomax.model import AnomalyModel
from anomax.preprocess.params import create_dl_preprocess_param
from anomax.registry import HEADS

TRAIN = {"max_num_epochs": 1, "batch_size": 4}  # for trained heads


def fitted_model(backbone_name: str, head_name: str, hyperparams: dict, adaptor_kwargs: dict,
                 size: int) -> AnomalyModel:
    """``backbone_name`` at width 0.25 (random init; 'a+b': a feature ensemble of both), the head fitted
    on 8 random size x size images."""
    names = backbone_name.split("+")
    members = [build_backbone(name, pretrained=None, width_multiplier=0.25) for name in names]
    backbone = members[0] if len(members) == 1 else ConcatBackbone(members)
    requirements = {k: v for k, v in backbone_requirements(names[0]).items() if k != "input_multiple"}
    preprocess = create_dl_preprocess_param(width=size, height=size, **requirements)
    adaptor = FeatureAdaptor(backbone.taps, **adaptor_kwargs)
    model = AnomalyModel(preprocess, backbone, adaptor, HEADS.get(head_name)(**hyperparams), batch_size=4)
    images = np.random.default_rng(0).normal(size=(8, size, size, 3)).astype(np.float32)
    features = model._features(backbone.params, model.adaptor_params, images)
    model.head.fit([{"image": images, "features": features, "valid": np.ones(8, bool)}], train=TRAIN)
    return model
