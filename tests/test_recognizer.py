"""The torch recogniser reproduces onnxruntime and lets gradients reach the input pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pv_ray.faces.recognizer import load_recognizer
from pv_ray.faces.tiny_pack import RECOGNIZER_FILE


def _onnxruntime(path: Path, batch: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def test_matches_onnxruntime_on_the_tiny_pack(tiny_face_pack: Path) -> None:
    path = tiny_face_pack / RECOGNIZER_FILE
    batch = np.random.default_rng(0).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
    expected = _onnxruntime(path, batch)
    model = load_recognizer(path)
    with torch.no_grad():
        got = model(torch.from_numpy(batch)).numpy()
    assert got.shape == (3, 512) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-4
    assert not model.training


def test_weights_frozen_but_input_gradients_flow(tiny_face_pack: Path) -> None:
    model = load_recognizer(tiny_face_pack / RECOGNIZER_FILE)
    params = list(model.parameters())
    assert params and all(not p.requires_grad for p in params)
    images = torch.zeros(2, 3, 112, 112).uniform_(-1, 1).requires_grad_(True)
    model(images).pow(2).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in params)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def test_other_export_ops_match_onnxruntime(tmp_path: Path) -> None:
    """Mul/Sub/Div constants, Transpose, Reshape, Relu, MatMul, Constant, Identity and an
    asymmetric-pad Conv, as found in other exports."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    m = rng.standard_normal((4 * 8 * 8, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.float32(0.5))),
        helper.make_node("Mul", ["x", "half"], ["a"]),
        helper.make_node("Sub", ["a", "shift"], ["b"]),
        helper.make_node("Div", ["b", "scale"], ["c"]),
        helper.make_node("Conv", ["c", "w"], ["d"], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Relu", ["d"], ["e"]),
        helper.make_node("Transpose", ["e"], ["f"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["f", "shape"], ["g"]),
        helper.make_node("MatMul", ["g", "m"], ["h"]),
        helper.make_node("Identity", ["h"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [
            _init("shift", np.float32(0.1)),
            _init("scale", np.float32(0.7)),
            _init("w", w),
            _init("shape", np.array([0, -1], np.int64)),
            _init("m", m),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "ops.onnx"
    onnx.save(model, str(path))
    batch = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        got = load_recognizer(path)(torch.from_numpy(batch)).numpy()
    assert np.abs(got - _onnxruntime(path, batch)).max() < 1e-4


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Erf", ["x"], ["y"])],
        "erf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    path = tmp_path / "erf.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(NotImplementedError, match="Erf"):
        load_recognizer(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        load_recognizer(tmp_path / "missing.onnx")
