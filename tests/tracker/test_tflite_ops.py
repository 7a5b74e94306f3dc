"""Unit tests for the TFLite semantics that are easy to get subtly wrong: DENSIFY, SAME padding,
DEPTH_TO_SPACE order, and refusing what is not ported."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker_svc.errors import UnsupportedModelError
from tracker_svc.model_setup import ModelPaths
from tracker_svc.tflite_torch import ops, read_graph
from tracker_svc.tflite_torch.densify import DimFormat, DimMetadata, Sparsity, densify
from tracker_svc.tflite_torch.flatbuffer import RUNTIME_OPS, FOLDED_OPS


# ---- DENSIFY -----------------------------------------------------------------------------

def test_densify_csr_matrix_example() -> None:
    # The 4×4 example of TFLite's sparse_tensor.json: rows dense, columns CSR.
    dense = np.array([[6, 0, 9, 8], [0, 0, 0, 0], [5, 0, 0, 0], [0, 0, 0, 7]], np.float32)
    sparsity = Sparsity(
        traversal_order=(0, 1),
        block_map=(),
        dim_metadata=(
            DimMetadata(DimFormat.DENSE, dense_size=4),
            DimMetadata(DimFormat.SPARSE_CSR, array_segments=(0, 3, 3, 4, 5), array_indices=(0, 2, 3, 0, 3)),
        ),
    )
    values = np.array([6, 9, 8, 5, 7], np.float32)
    np.testing.assert_array_equal(densify(values, (4, 4), sparsity), dense)


def test_densify_block_sparse_example() -> None:
    # TFLite's block-sparse example: 4×4 matrix of 2×2 blocks, block rows dense, block cols CSR.
    dense = np.array([[1, 0, 0, 0], [2, 3, 0, 0], [0, 0, 0, 0], [0, 0, 4, 5]], np.float32)
    sparsity = Sparsity(
        traversal_order=(0, 1, 2, 3),
        block_map=(0, 1),
        dim_metadata=(
            DimMetadata(DimFormat.DENSE, dense_size=2),
            DimMetadata(DimFormat.SPARSE_CSR, array_segments=(0, 1, 2), array_indices=(0, 1)),
            DimMetadata(DimFormat.DENSE, dense_size=2),
            DimMetadata(DimFormat.DENSE, dense_size=2),
        ),
    )
    values = np.array([1, 0, 2, 3, 0, 0, 4, 5], np.float32)
    np.testing.assert_array_equal(densify(values, (4, 4), sparsity), dense)


def _encode(dense: np.ndarray, order: tuple[int, ...], sparse_levels: set[int]) -> tuple[np.ndarray, Sparsity]:
    """Reference encoder (straightforward recursion) for random round trips."""
    dims = [dense.shape[d] for d in order]
    metas: list[dict] = [{"segments": [0], "indices": []} for _ in order]
    values: list[float] = []

    def subtree_nonzero(prefix: tuple[int, ...]) -> bool:
        index = [slice(None)] * dense.ndim
        for level, coordinate in enumerate(prefix):
            index[order[level]] = coordinate
        return bool(np.any(dense[tuple(index)]))

    def walk(level: int, prefix: tuple[int, ...]) -> None:
        if level == len(order):
            index = [0] * dense.ndim
            for lv, coordinate in enumerate(prefix):
                index[order[lv]] = coordinate
            values.append(dense[tuple(index)])
            return
        for coordinate in range(dims[level]):
            child = prefix + (coordinate,)
            if level in sparse_levels:
                if not subtree_nonzero(child):
                    continue
                metas[level]["indices"].append(coordinate)
            walk(level + 1, child)
        if level in sparse_levels:
            metas[level]["segments"].append(len(metas[level]["indices"]))

    walk(0, ())
    levels = tuple(
        DimMetadata(DimFormat.SPARSE_CSR, array_segments=tuple(m["segments"]), array_indices=tuple(m["indices"]))
        if level in sparse_levels else DimMetadata(DimFormat.DENSE, dense_size=dims[level])
        for level, m in enumerate(metas)
    )
    return np.array(values, dense.dtype), Sparsity(tuple(order), (), levels)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_densify_round_trips_random_sparse_tensors(shape: list[int], density: float, seed: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    dense = (rng.random(shape) < density) * rng.integers(1, 9, size=shape).astype(np.float32)
    order = tuple(data.draw(st.permutations(range(len(shape)))))
    sparse_levels = data.draw(st.sets(st.integers(1, len(shape) - 1)))  # CSR needs a parent level
    values, sparsity = _encode(dense, order, sparse_levels)
    np.testing.assert_array_equal(densify(values, tuple(shape), sparsity), dense)


def test_densify_rejects_inconsistent_buffer() -> None:
    sparsity = Sparsity((0,), (), (DimMetadata(DimFormat.DENSE, dense_size=3),))
    with pytest.raises(ValueError):
        densify(np.ones(2, np.float32), (3,), sparsity)


def test_detector_sparse_weights_fold_to_dense(models: ModelPaths) -> None:
    graph = read_graph(models.detector)
    assert {op.opcode for op in graph.operators} <= RUNTIME_OPS
    assert not {op.opcode for op in graph.operators} & FOLDED_OPS
    # Every conv filter is a float32 constant with zeros where the sparse encoding had no value.
    filters = [graph.constants[op.inputs[1]] for op in graph.operators if op.opcode == "CONV_2D"]
    assert all(f.dtype == np.float32 for f in filters)
    assert any((f == 0).mean() > 0.3 for f in filters)


# ---- SAME padding ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "expected"),
    [
        (8, 3, 1, 1, (1, 1)),
        (8, 3, 2, 1, (0, 1)),  # even input, stride 2: the odd pixel goes after
        (7, 3, 2, 1, (1, 1)),
        (8, 5, 2, 1, (1, 2)),
        (4, 2, 2, 1, (0, 0)),
        (9, 3, 1, 2, (2, 2)),
        (1, 3, 2, 1, (1, 1)),
    ],
)
def test_same_padding(size: int, kernel: int, stride: int, dilation: int, expected: tuple[int, int]) -> None:
    assert ops.same_padding(size, kernel, stride, dilation) == expected
    before, after = expected
    out = (size + before + after - ((kernel - 1) * dilation + 1)) // stride + 1
    assert out == -(-size // stride)  # ceil(in / stride)


def test_asymmetric_same_conv_pads_bottom_right() -> None:
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    weight = torch.ones(1, 1, 3, 3)
    step = ops.Conv2d((0,), 1, weight, None, (2, 2), (1, 1), (0, 1, 0, 1), 1, ops.Activation.NONE)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), weight, stride=2)
    torch.testing.assert_close(step(x), expected)
    # top-left output window starts at pixel (0, 0): no padding before
    assert step(x)[0, 0, 0, 0].item() == x[0, 0, :3, :3].sum().item()


# ---- DEPTH_TO_SPACE ----------------------------------------------------------------------

def _depth_to_space_reference(x_nhwc: np.ndarray, block: int) -> np.ndarray:
    """TFLite definition, element by element: out[n, h·b+i, w·b+j, c] = in[n, h, w, (i·b+j)·C + c]."""
    n, h, w, depth = x_nhwc.shape
    c_out = depth // (block * block)
    out = np.zeros((n, h * block, w * block, c_out), x_nhwc.dtype)
    for i in range(block):
        for j in range(block):
            for c in range(c_out):
                out[:, i::block, j::block, c] = x_nhwc[:, :, :, (i * block + j) * c_out + c]
    return out


@pytest.mark.parametrize("channels_last", [False, True])
def test_depth_to_space_is_dcr(channels_last: bool) -> None:
    x_nhwc = np.random.default_rng(0).standard_normal((2, 3, 4, 12)).astype(np.float32)
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous()
    ours = ops.depth_to_space_nchw(x, 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, _depth_to_space_reference(x_nhwc, 2))
    # pixel_shuffle (CRD order) is a different permutation: the port must not use it
    crd = F.pixel_shuffle(x.contiguous(), 2).permute(0, 2, 3, 1).numpy()
    assert not np.array_equal(crd, ours)


# ---- refusing what is not ported ----------------------------------------------------------

def test_unsupported_resize_mode_is_refused() -> None:
    with pytest.raises(UnsupportedModelError):
        ops.ResizeBilinear((0,), 1, (4, 4), align_corners=False, half_pixel_centers=False)


def test_unsupported_activation_is_refused() -> None:
    with pytest.raises(UnsupportedModelError):
        ops.Add((0, 1), 2, activation=5)  # SIGN_BIT


def test_unknown_operator_is_refused(models: ModelPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    from tracker_svc.tflite_torch import flatbuffer

    monkeypatch.setattr(flatbuffer, "RUNTIME_OPS", flatbuffer.RUNTIME_OPS - {"LOGISTIC"})
    with pytest.raises(UnsupportedModelError, match="LOGISTIC"):
        read_graph(models.landmark)
