"""A tiny insightface-format face pack (detector + recognizer), built offline from a seed.

The pack is a folder with two ONNX files that insightface's own ``FaceAnalysis`` loads and
routes by signature, exactly like a real ``buffalo_l`` / ``antelopev2`` pack:

``det_tiny.onnx`` (SCRFD output layout: 9 outputs, strides 8/16/32, 2 anchors per location)
    A handcrafted face-pattern detector, not a trained one. Its rule:

    1. luma of the SCRFD-normalised RGB input, average-pooled to each stride's grid;
    2. at every grid location and for two box sizes per stride (anchor 0: 8 cells, anchor 1:
       16 cells), the normalised cross-correlation (NCC) of that window with a synthetic
       face pattern: the mean of scikit-image's 100 LFW face crops (shipped offline), framed
       so its eyes and mouth sit where the ArcFace template puts them;
    3. score = sigmoid(gain * (NCC - ncc_threshold)) * sigmoid(gain * (std - min_contrast)):
       the second factor is a contrast gate, so uniform or low-contrast windows never score;
    4. windows reaching past the input's border score 0;
    5. the box is the window itself (distances in stride units, as SCRFD decodes them), and the
       5 keypoints are the ArcFace template points scaled into the box, so aligning on them
       crops exactly the detected window.

    It answers "no face" on uniform and low-contrast images and finds face-like windows in
    real photos (on an aligned portrait the largest box is the face). It is a crude template
    matcher: it also fires on other textured regions, so on a busy photo the largest box may
    not be the person's face. That is acceptable for a test model whose job is to exercise
    insightface's real code paths and the identity loss end to end.

``rec_tiny.onnx`` (ArcFace signature: ``(N, 3, 112, 112)`` -> ``(N, 512)``)
    A small IResNet-shaped network (Conv, BatchNormalization, PRelu, Add, Flatten, Gemm) with
    seeded random weights: a random-feature embedding. The output BatchNorm is calibrated on
    seeded smooth random images so embeddings are centred, which makes cosine similarity
    informative (different faces differ clearly, a slightly shifted image stays close).

Both graphs are written with ``onnx.helper`` from numpy arrays, so the same seed always gives
byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pv_ray.faces.arcface import ARCFACE_TEMPLATE, CROP_SIZE, EMBEDDING_DIM

DETECTOR_FILE = "det_tiny.onnx"
RECOGNIZER_FILE = "rec_tiny.onnx"

_OPSET = 17
_IR_VERSION = 8  # readable by every onnxruntime insightface 2.1 supports
_STRIDES = (8, 16, 32)
_ANCHOR_CELLS = (8, 16)  # window size, in grid cells, of anchor 0 and anchor 1
_NCC_THRESHOLD = 0.6
_MIN_CONTRAST = 0.08  # luma std in SCRFD's normalised units ((x - 127.5) / 128)
_GAIN = 25.0


def build_tiny_face_pack(out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``det_tiny.onnx`` and ``rec_tiny.onnx`` into ``out_dir`` and return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _save(_detector_model(rng), out / DETECTOR_FILE)
    _save(_recognizer_model(rng), out / RECOGNIZER_FILE)
    return out


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="pv-ray")
    model.ir_version = _IR_VERSION
    return model


# ---------------------------------------------------------------------------------------------
# detector


def _mean_face() -> np.ndarray:
    """Mean of the 100 face crops of scikit-image's LFW subset (25x25 grey, shipped offline)."""
    import skimage.data

    path = Path(skimage.data.__file__).parent / "lfw_subset.npy"
    crops = np.load(path, allow_pickle=False)  # first 100 are faces, last 100 are not
    return crops[:100].mean(axis=0).astype(np.float32)


# Where the ArcFace 112x112 crop lies in the LFW mean face, in its pixels: fitted by hand so
# the mean face's eyes and mouth land on the ArcFace template points.
_MEAN_FACE_BOX = (-1.8, -2.85, 25.7)  # left, top, side


def _face_pattern(taps: int, rng: np.random.Generator) -> np.ndarray:
    """The mean face over the ArcFace crop, area-sampled to ``taps`` x ``taps``, made zero-mean
    and unit-norm, with seeded small perturbations."""
    import cv2

    left, top, side = _MEAN_FACE_BOX
    supersample = 8
    n = taps * supersample
    step = side / n
    # cv2 maps output pixel centres (i + 0.5) to source pixel centres (x + 0.5).
    to_source = np.array([[step, 0, left + step / 2 - 0.5], [0, step, top + step / 2 - 0.5]], np.float32)
    fine = cv2.warpAffine(
        _mean_face(), to_source, (n, n), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )
    pattern = fine.reshape(taps, supersample, taps, supersample).mean(axis=(1, 3))
    pattern = pattern - pattern.mean()
    pattern = pattern / np.linalg.norm(pattern)
    pattern = pattern + 0.01 * rng.standard_normal(pattern.shape)
    pattern = pattern - pattern.mean()
    return (pattern / np.linalg.norm(pattern)).astype(np.float32)


class _GraphBuilder:
    """Collects nodes and initializers with unique, readable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str, **attrs) -> str:
        self._count += 1
        out = f"{prefix}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{prefix}_{op_type}_{self._count}", **attrs))
        return out


def _detector_model(rng: np.random.Generator) -> onnx.ModelProto:
    g = _GraphBuilder()
    luma_w = np.array([0.299, 0.587, 0.114], np.float32).reshape(1, 3, 1, 1)
    luma = g.op("Conv", ["input.1", g.const("luma_weight", luma_w)], "luma")
    consts = {
        "eps": g.const("eps", np.array(1e-4, np.float32)),
        "gain": g.const("gain", np.array(_GAIN, np.float32)),
        "ncc_threshold": g.const("ncc_threshold", np.float32(_NCC_THRESHOLD + 0.02 * rng.standard_normal())),
        "min_contrast": g.const("min_contrast", np.float32(_MIN_CONTRAST)),
        "zero": g.const("zero", np.float32(0.0)),
        "one": g.const("one", np.float32(1.0)),
        "almost_one": g.const("almost_one", np.float32(0.999)),
    }
    outputs: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for stride in _STRIDES:
        grid = g.op("AveragePool", [luma], f"s{stride}_grid", kernel_shape=[stride, stride], strides=[stride, stride])
        # Ones inside the input: windows that reach past its border are dropped below.
        inside = g.op("Add", [g.op("Mul", [grid, consts["zero"]], "inside"), consts["one"]], "inside")
        anchors = [
            _anchor_outputs(g, consts, grid, inside, stride, a, cells, rng) for a, cells in enumerate(_ANCHOR_CELLS)
        ]
        for (kind, width), values in zip((("score", 1), ("bbox", 4), ("kps", 10)), zip(*anchors)):
            # (1, anchors*width, h, w) -> (h*w*anchors, width): SCRFD's non-batched layout.
            stacked = g.op("Concat", list(values), f"s{stride}_cat", axis=1)
            nhwc = g.op("Transpose", [stacked], f"s{stride}_nhwc", perm=[0, 2, 3, 1])
            shape = g.const(f"s{stride}_shape{width}", np.array([-1, width], np.int64))
            outputs[kind].append(g.op("Reshape", [nhwc, shape], f"s{stride}_out{width}"))
    output_names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in _STRIDES]
    widths = [1] * 3 + [4] * 3 + [10] * 3
    for src, dst in zip(outputs["score"] + outputs["bbox"] + outputs["kps"], output_names):
        g.nodes.append(helper.make_node("Identity", [src], [dst], name=f"{dst}_Identity"))
    graph = helper.make_graph(
        g.nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_anchors", width])
            for name, width in zip(output_names, widths)
        ],
        g.initializers,
    )
    return _make_model(graph)


def _anchor_outputs(
    g: _GraphBuilder, consts: dict[str, str], grid: str, inside: str, stride: int, anchor: int, cells: int, rng
) -> tuple[str, str, str]:
    """(score, box, keypoints) maps of one anchor at one stride: the NCC of each window with the
    face pattern, gated by contrast and by lying fully inside the input."""
    # Anchor 1 looks at 2x2-cell blocks through a dilated pattern: a window twice
    # as large at the same grid resolution.
    dilation = cells // _ANCHOR_CELLS[0]
    taps = _ANCHOR_CELLS[0]
    src = grid
    if dilation > 1:
        blocks = dict(kernel_shape=[dilation, dilation], strides=[1, 1], pads=[0, 0, dilation - 1, dilation - 1])
        src = g.op("AveragePool", [grid], f"s{stride}a{anchor}_blocks", count_include_pad=0, **blocks)
        inside = g.op("AveragePool", [inside], f"s{stride}a{anchor}_inside", count_include_pad=1, **blocks)
    # The window of output (i, j) spans cells [i - cells/2, i + cells/2): centred on
    # the anchor point (j * stride, i * stride) that SCRFD decodes from.
    before = cells // 2
    after = cells - before - dilation
    conv = dict(dilations=[dilation, dilation], pads=[before, before, after, after])
    pattern = _face_pattern(taps, rng).reshape(1, 1, taps, taps)
    box_filter = np.full((1, 1, taps, taps), 1.0 / taps**2, np.float32)
    name = f"s{stride}a{anchor}"
    corr = g.op("Conv", [src, g.const(f"{name}_pattern", pattern)], name, **conv)
    mean = g.op("Conv", [src, g.const(f"{name}_box", box_filter)], name, **conv)
    sq = g.op("Mul", [src, src], name)
    mean_sq = g.op("Conv", [sq, g.const(f"{name}_box_sq", box_filter)], name, **conv)
    var = g.op("Sub", [mean_sq, g.op("Mul", [mean, mean], name)], name)
    std = g.op("Sqrt", [g.op("Relu", [var], name)], name)
    # NCC = <pattern, window> / (|window - mean|); |window - mean| = std * taps.
    denom = g.op("Mul", [g.op("Add", [std, consts["eps"]], name), g.const(f"{name}_taps", np.float32(taps))], name)
    ncc = g.op("Div", [corr, denom], name)
    gain = consts["gain"]
    face_like = g.op("Sigmoid", [g.op("Mul", [g.op("Sub", [ncc, consts["ncc_threshold"]], name), gain], name)], name)
    contrast = g.op("Sigmoid", [g.op("Mul", [g.op("Sub", [std, consts["min_contrast"]], name), gain], name)], name)
    window_inside = g.op("Conv", [inside, g.const(f"{name}_box_inside", box_filter)], name, **conv)
    fully_inside = g.op(
        "Cast", [g.op("Greater", [window_inside, consts["almost_one"]], name)], name, to=TensorProto.FLOAT
    )
    score = g.op("Mul", [g.op("Mul", [face_like, contrast], name), fully_inside], name)
    # Box and keypoints are constant per anchor (stride units from the anchor point),
    # broadcast over the grid by multiplying with a map of ones.
    box = np.array([before, before, cells - before, cells - before], np.float32)
    kps = (ARCFACE_TEMPLATE.astype(np.float32) / CROP_SIZE * cells - before).astype(np.float32)
    ones = g.op("Add", [g.op("Mul", [score, consts["zero"]], name), consts["one"]], name)
    box_map = g.op("Mul", [ones, g.const(f"{name}_bbox", box.reshape(1, 4, 1, 1))], name)
    kps_map = g.op("Mul", [ones, g.const(f"{name}_kps", kps.reshape(1, 10, 1, 1))], name)
    return score, box_map, kps_map


# ---------------------------------------------------------------------------------------------
# recognizer


_REC_WIDTHS = (8, 16, 32, 64)  # stem, then one residual block per stage (each halves H, W)
_CALIBRATION_IMAGES = 64


def _recognizer_model(rng: np.random.Generator) -> onnx.ModelProto:
    """IResNet-shaped random-feature network, output BatchNorm calibrated to centre embeddings."""
    g = _GraphBuilder()
    x = _conv_bn_prelu(g, rng, "input.1", 3, _REC_WIDTHS[0], stride=2, name="stem")
    for stage, (cin, cout) in enumerate(zip(_REC_WIDTHS[:-1], _REC_WIDTHS[1:]), start=1):
        x = _residual_block(g, rng, x, cin, cout, name=f"layer{stage}")
    side = CROP_SIZE // 2 ** len(_REC_WIDTHS)
    x = _batch_norm(g, rng, x, _REC_WIDTHS[-1], name="bn2")
    x = g.op("Flatten", [x], "flatten", axis=1)
    features_in = _REC_WIDTHS[-1] * side * side
    fc_w = (rng.standard_normal((EMBEDDING_DIM, features_in)) / np.sqrt(features_in)).astype(np.float32)
    fc = g.op(
        "Gemm", [x, g.const("fc.weight", fc_w), g.const("fc.bias", np.zeros(EMBEDDING_DIM, np.float32))], "fc", transB=1
    )
    input_info = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, CROP_SIZE, CROP_SIZE])

    # Centre and whiten the embedding on seeded smooth random images: random features share a
    # large common component, which would make every cosine similarity high.
    fc_model = _make_model(
        helper.make_graph(
            g.nodes,
            "tiny_iresnet_fc",
            [input_info],
            [helper.make_tensor_value_info(fc, TensorProto.FLOAT, ["batch", EMBEDDING_DIM])],
            g.initializers,
        )
    )
    fc_out = _run_single_threaded(fc_model, _calibration_images(rng))
    mean, var = fc_out.mean(axis=0), fc_out.var(axis=0) + 1e-3
    features = g.op(
        "BatchNormalization",
        [
            fc,
            g.const("features.weight", np.ones(EMBEDDING_DIM, np.float32)),
            g.const("features.bias", np.zeros(EMBEDDING_DIM, np.float32)),
            g.const("features.running_mean", mean.astype(np.float32)),
            g.const("features.running_var", var.astype(np.float32)),
        ],
        "features",
        epsilon=1e-5,
    )
    g.nodes.append(helper.make_node("Identity", [features], ["embedding"], name="embedding_Identity"))
    graph = helper.make_graph(
        g.nodes,
        "tiny_iresnet",
        [input_info],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM])],
        g.initializers,
    )
    return _make_model(graph)


def _conv(
    g: _GraphBuilder, rng: np.random.Generator, x: str, cin: int, cout: int, *, kernel: int, stride: int, name: str
) -> str:
    fan_in = cin * kernel * kernel
    weight = (rng.standard_normal((cout, cin, kernel, kernel)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    pad = kernel // 2
    return g.op(
        "Conv",
        [x, g.const(f"{name}.weight", weight)],
        name,
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[pad] * 4,
    )


def _batch_norm(g: _GraphBuilder, rng: np.random.Generator, x: str, channels: int, *, name: str) -> str:
    # Near-identity statistics with seeded jitter, so the converted graph exercises every term.
    def jitter(scale: float) -> np.ndarray:
        return (scale * rng.standard_normal(channels)).astype(np.float32)

    params = [
        g.const(f"{name}.weight", 1.0 + jitter(0.05)),
        g.const(f"{name}.bias", jitter(0.05)),
        g.const(f"{name}.running_mean", jitter(0.05)),
        g.const(f"{name}.running_var", np.exp(jitter(0.1)).astype(np.float32)),
    ]
    return g.op("BatchNormalization", [x, *params], name, epsilon=1e-5)


def _prelu(g: _GraphBuilder, rng: np.random.Generator, x: str, channels: int, *, name: str) -> str:
    slope = (0.25 + 0.02 * rng.standard_normal(channels)).astype(np.float32).reshape(channels, 1, 1)
    return g.op("PRelu", [x, g.const(f"{name}.weight", slope)], name)


def _conv_bn_prelu(
    g: _GraphBuilder, rng: np.random.Generator, x: str, cin: int, cout: int, *, stride: int, name: str
) -> str:
    x = _conv(g, rng, x, cin, cout, kernel=3, stride=stride, name=f"{name}.conv")
    x = _batch_norm(g, rng, x, cout, name=f"{name}.bn")
    return _prelu(g, rng, x, cout, name=f"{name}.prelu")


def _residual_block(g: _GraphBuilder, rng: np.random.Generator, x: str, cin: int, cout: int, *, name: str) -> str:
    """IResNet's IBasicBlock: BN-Conv-BN-PReLU-Conv(stride 2)-BN, plus a 1x1 strided shortcut."""
    y = _batch_norm(g, rng, x, cin, name=f"{name}.bn1")
    y = _conv(g, rng, y, cin, cout, kernel=3, stride=1, name=f"{name}.conv1")
    y = _batch_norm(g, rng, y, cout, name=f"{name}.bn2")
    y = _prelu(g, rng, y, cout, name=f"{name}.prelu")
    y = _conv(g, rng, y, cout, cout, kernel=3, stride=2, name=f"{name}.conv2")
    y = _batch_norm(g, rng, y, cout, name=f"{name}.bn3")
    shortcut = _conv(g, rng, x, cin, cout, kernel=1, stride=2, name=f"{name}.downsample.conv")
    shortcut = _batch_norm(g, rng, shortcut, cout, name=f"{name}.downsample.bn")
    return g.op("Add", [y, shortcut], f"{name}.add")


def _calibration_images(rng: np.random.Generator) -> np.ndarray:
    """Smooth random RGB images in [-1, 1]: coarse noise upsampled, several scales summed."""
    import cv2

    size = CROP_SIZE
    images = np.zeros((_CALIBRATION_IMAGES, size, size, 3), np.float32)
    for image in images:
        for cells in (2, 4, 8, 16):
            coarse = rng.standard_normal((cells, cells, 3)).astype(np.float32) / np.sqrt(cells)
            image += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    images = np.tanh(images)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def _run_single_threaded(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # reproducible reductions: the pack's bytes depend on them
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]
