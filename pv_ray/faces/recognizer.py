"""A differentiable torch copy of an insightface recognition ONNX model.

The identity loss needs gradients through the face recogniser, which insightface only ships
as ONNX. ``load_recognizer`` reads the graph and its initializers (plain tensors, no pickle)
and replays it node by node with torch ops, so the output matches onnxruntime's. It supports
the ops of insightface's IResNet exports (w600k_r50 in buffalo_l, glintr100 in antelopev2)
and of the tiny pack's recogniser.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

__all__ = ["OnnxRecognizer", "load_recognizer", "SUPPORTED_OPS"]


def load_recognizer(onnx_path: str | Path) -> OnnxRecognizer:
    """Load a recognition ONNX model as a frozen float32 torch module in eval mode.

    The module takes RGB ``(N, 3, H, W)`` in [-1, 1] (the VAE's output range, which is also
    ArcFace's ``(x - 127.5) / 127.5``) and returns the raw, un-normalised ``(N, D)`` embedding.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"recognition model not found: {path}")
    return OnnxRecognizer(onnx.load(str(path)))


class OnnxRecognizer(nn.Module):
    """Replays an ONNX graph with torch ops; weights are frozen parameters."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        unsupported = sorted({node.op_type for node in graph.node} - set(SUPPORTED_OPS))
        if unsupported:
            raise NotImplementedError(f"ONNX ops not supported by the torch recogniser: {', '.join(unsupported)}")
        initializer_names = {init.name for init in graph.initializer}
        inputs = [value.name for value in graph.input if value.name not in initializer_names]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ValueError(
                f"a recognition model has one input and one output, got inputs {inputs} and {len(graph.output)} outputs"
            )
        self.input_name = inputs[0]
        self.output_name = graph.output[0].name
        self.nodes = list(graph.node)
        # Float tensors become frozen parameters (so .to(device) moves them); integer ones
        # (shapes, axes) stay numpy constants.
        self.weights = nn.ParameterList()
        self._weight_index: dict[str, int] = {}
        self._constants: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            self._add_tensor(init.name, numpy_helper.to_array(init))
        for node in self.nodes:
            if node.op_type == "Constant":
                self._add_tensor(node.output[0], _constant_value(node))
        self.raw_pixel_input = _expects_raw_pixels(graph)
        self.eval()

    def _add_tensor(self, name: str, value: np.ndarray) -> None:
        if np.issubdtype(value.dtype, np.floating):
            tensor = torch.from_numpy(np.array(value, dtype=np.float32))
            self._weight_index[name] = len(self.weights)
            self.weights.append(nn.Parameter(tensor, requires_grad=False))
        else:
            self._constants[name] = np.array(value)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
        if self.raw_pixel_input:
            # mxnet exports normalise inside the graph and take raw 0..255 pixels.
            images = images * 127.5 + 127.5
        values: dict[str, torch.Tensor | np.ndarray] = {self.input_name: images}
        for name, index in self._weight_index.items():
            values[name] = self.weights[index]
        values.update(self._constants)
        for node in self.nodes:
            if node.op_type == "Constant":
                continue
            args = [values[name] if name else None for name in node.input]
            values[node.output[0]] = _OPS[node.op_type](args, _attributes(node))
        return values[self.output_name]


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
    raise NotImplementedError(f"Constant node {node.name!r} without a 'value' tensor")


def _attributes(node: onnx.NodeProto) -> dict:
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def _expects_raw_pixels(graph: onnx.GraphProto) -> bool:
    """insightface's own rule (ArcFaceONNX): mxnet exports start with Sub and Mul nodes."""
    first = [node.name for node in graph.node[:8]]
    has_sub = any(name.startswith(("Sub", "_minus")) for name in first)
    has_mul = any(name.startswith(("Mul", "_mul")) for name in first)
    return has_sub and has_mul


def _as_tensor(value: torch.Tensor | np.ndarray, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value, device=like.device)


def _conv(args: list, attrs: dict) -> torch.Tensor:
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"Conv auto_pad={auto_pad}")
    spatial = weight.ndim - 2
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    begin, end = pads[:spatial], pads[spatial:]
    if begin != end:
        # ONNX pads are (begin..., end...); F.pad wants the last axis first.
        x = F.pad(x, [p for axis in reversed(range(spatial)) for p in (begin[axis], end[axis])])
        begin = [0] * spatial
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(
        x,
        weight,
        bias,
        stride=attrs.get("strides", 1),
        padding=begin,
        dilation=attrs.get("dilations", 1),
        groups=attrs.get("group", 1),
    )


def _batch_norm(args: list, attrs: dict) -> torch.Tensor:
    x, scale, bias, mean, var = args[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=attrs.get("epsilon", 1e-5))


def _prelu(args: list, attrs: dict) -> torch.Tensor:
    x, slope = args
    return torch.where(x >= 0, x, x * slope)


def _flatten(args: list, attrs: dict) -> torch.Tensor:
    x = args[0]
    axis = attrs.get("axis", 1) % max(x.ndim, 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _gemm(args: list, attrs: dict) -> torch.Tensor:
    a, b = args[0], args[1]
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        y = y + attrs.get("beta", 1.0) * _as_tensor(args[2], y)
    return y


def _reshape(args: list, attrs: dict) -> torch.Tensor:
    x, shape = args
    shape = [int(v) for v in np.asarray(shape.detach().cpu() if isinstance(shape, torch.Tensor) else shape)]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[list, dict], torch.Tensor]:
    def apply(args: list, attrs: dict) -> torch.Tensor:
        a, b = args
        like = a if isinstance(a, torch.Tensor) else b
        return fn(_as_tensor(a, like), _as_tensor(b, like))

    return apply


_OPS: dict[str, Callable[[list, dict], torch.Tensor]] = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "PRelu": _prelu,
    "Relu": lambda args, attrs: F.relu(args[0]),
    "Sigmoid": lambda args, attrs: torch.sigmoid(args[0]),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Flatten": _flatten,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Reshape": _reshape,
    "Transpose": lambda args, attrs: (
        args[0].permute(*attrs["perm"]) if "perm" in attrs else args[0].permute(*reversed(range(args[0].ndim)))
    ),
    "Identity": lambda args, attrs: args[0],
    # Inference-mode dropout is the identity (its optional mask output is not supported).
    "Dropout": lambda args, attrs: args[0],
    "Constant": lambda args, attrs: None,  # folded into constants at load time
}
SUPPORTED_OPS = tuple(_OPS)
