"""Read a .tflite flatbuffer into a plain `Graph`, with constant weights folded to float32 arrays.

Only what the interpreter needs is read: tensor shapes and names, constant buffers, and per-op
options. DENSIFY and DEQUANTIZE on constants are evaluated here, once, so the runtime graph holds
plain float32 weights and only the operators that touch activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tflite
from tflite.BuiltinOperator import BuiltinOperator
from tflite.TensorType import TensorType

from tracker_svc.errors import UnsupportedModelError
from tracker_svc.tflite_torch.densify import DimFormat, DimMetadata, Sparsity, densify

# Operators folded into constants at load time (their inputs are all constant in these models).
FOLDED_OPS = frozenset({"DEQUANTIZE", "DENSIFY"})
# Operators executed on activations by the torch module.
RUNTIME_OPS = frozenset({
    "PAD", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MAX_POOL_2D", "RESIZE_BILINEAR",
    "DEPTH_TO_SPACE", "RESHAPE", "CONCATENATION", "LOGISTIC",
})

_OP_NAMES = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
_NUMPY_TYPES = {
    TensorType.FLOAT32: np.float32,
    TensorType.FLOAT16: np.float16,
    TensorType.INT32: np.int32,
}
_SPARSE_INDEX_TYPES = {1: "Int32Vector", 2: "Uint16Vector", 3: "Uint8Vector"}  # SparseIndexVector union


@dataclass(frozen=True)
class TensorSpec:
    index: int
    name: str
    shape: tuple[int, ...]  # TFLite layout (NHWC for 4-D), batch 1
    dtype: type


@dataclass(frozen=True)
class Operator:
    opcode: str  # e.g. "CONV_2D"
    inputs: tuple[int, ...]  # tensor indices; -1 marks an omitted optional input
    outputs: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    tensors: list[TensorSpec]
    constants: dict[int, np.ndarray]  # tensor index → value (float32 weights, int32 shapes)
    operators: list[Operator]  # runtime operators only, in execution order
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class _SparseConstant:
    values: np.ndarray
    sparsity: Sparsity


def read_graph(path: Path | str) -> Graph:
    """Parses the model's single subgraph; raises UnsupportedModelError on anything not ported."""
    buf = Path(path).read_bytes()
    model = tflite.Model.GetRootAsModel(buf, 0)
    if model.SubgraphsLength() != 1:
        raise UnsupportedModelError(f"{path}: {model.SubgraphsLength()} subgraphs, expected 1")
    subgraph = model.Subgraphs(0)
    tensors = [_tensor_spec(subgraph.Tensors(i), i) for i in range(subgraph.TensorsLength())]
    constants = _read_constants(model, subgraph)
    operators = [_operator(model, subgraph.Operators(i)) for i in range(subgraph.OperatorsLength())]
    unsupported = sorted({op.opcode for op in operators} - FOLDED_OPS - RUNTIME_OPS)
    if unsupported:
        raise UnsupportedModelError(f"{path}: unsupported operators {unsupported}")
    runtime_ops = _fold_constants(operators, constants, tensors)
    graph = Graph(
        tensors=tensors,
        constants=constants,  # type: ignore[arg-type]  # sparse entries are all folded by now
        operators=runtime_ops,
        inputs=tuple(int(i) for i in subgraph.InputsAsNumpy()),
        outputs=tuple(int(i) for i in subgraph.OutputsAsNumpy()),
    )
    _check_float_activations(graph)
    return graph


def _tensor_spec(tensor: tflite.Tensor, index: int) -> TensorSpec:
    ttype = tensor.Type()
    if ttype not in _NUMPY_TYPES:
        raise UnsupportedModelError(f"tensor {tensor.Name().decode()} has unsupported type {ttype}")
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    return TensorSpec(index, tensor.Name().decode(), shape, _NUMPY_TYPES[ttype])


def _read_constants(model: tflite.Model, subgraph: tflite.SubGraph) -> dict[int, np.ndarray | _SparseConstant]:
    constants: dict[int, np.ndarray | _SparseConstant] = {}
    for i in range(subgraph.TensorsLength()):
        tensor = subgraph.Tensors(i)
        buffer = model.Buffers(tensor.Buffer())
        if buffer is None or buffer.DataLength() == 0:
            continue
        if buffer.Offset() > 1:
            raise UnsupportedModelError("buffers stored outside the flatbuffer are not supported")
        values = np.frombuffer(buffer.DataAsNumpy().tobytes(), dtype=_NUMPY_TYPES[tensor.Type()])
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        sparsity = tensor.Sparsity()
        if sparsity is not None:
            constants[i] = _SparseConstant(values, _read_sparsity(sparsity))
        else:
            constants[i] = values.reshape(shape)
    return constants


def _read_sparsity(params: tflite.SparsityParameters) -> Sparsity:
    levels = []
    for d in range(params.DimMetadataLength()):
        meta = params.DimMetadata(d)
        if meta.Format() == DimFormat.DENSE:
            levels.append(DimMetadata(DimFormat.DENSE, dense_size=int(meta.DenseSize())))
        else:
            levels.append(DimMetadata(
                DimFormat.SPARSE_CSR,
                array_segments=_index_vector(meta.ArraySegmentsType(), meta.ArraySegments()),
                array_indices=_index_vector(meta.ArrayIndicesType(), meta.ArrayIndices()),
            ))
    block_map = tuple(int(b) for b in params.BlockMapAsNumpy()) if params.BlockMapLength() else ()
    return Sparsity(
        traversal_order=tuple(int(t) for t in params.TraversalOrderAsNumpy()),
        block_map=block_map,
        dim_metadata=tuple(levels),
    )


def _index_vector(union_type: int, table: Any) -> tuple[int, ...]:
    if union_type not in _SPARSE_INDEX_TYPES:
        raise UnsupportedModelError(f"sparse index vector type {union_type} not supported")
    vector = getattr(tflite, _SPARSE_INDEX_TYPES[union_type])()
    vector.Init(table.Bytes, table.Pos)
    return tuple(int(v) for v in vector.ValuesAsNumpy()) if vector.ValuesLength() else ()


def _operator(model: tflite.Model, op: tflite.Operator) -> Operator:
    code = model.OperatorCodes(op.OpcodeIndex())
    # Newer files store the code in BuiltinCode, older ones (codes < 127) in DeprecatedBuiltinCode.
    opcode = _OP_NAMES.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
    read_options = _OPTION_READERS.get(opcode)
    options = read_options(op.BuiltinOptions()) if read_options and op.BuiltinOptions() else {}
    return Operator(
        opcode=opcode,
        inputs=tuple(int(i) for i in op.InputsAsNumpy()) if op.InputsLength() else (),
        outputs=tuple(int(i) for i in op.OutputsAsNumpy()) if op.OutputsLength() else (),
        options=options,
    )


def _fold_constants(
    operators: list[Operator],
    constants: dict[int, np.ndarray | _SparseConstant],
    tensors: list[TensorSpec],
) -> list[Operator]:
    runtime: list[Operator] = []
    for op in operators:
        if op.opcode not in FOLDED_OPS:
            runtime.append(op)
            continue
        source = op.inputs[0]
        if source not in constants:
            raise UnsupportedModelError(f"{op.opcode} on a non-constant tensor is not supported")
        value = constants[source]
        if op.opcode == "DENSIFY":
            if not isinstance(value, _SparseConstant):
                raise UnsupportedModelError(f"DENSIFY input {tensors[source].name} is not sparse")
            constants[op.outputs[0]] = densify(value.values, tensors[op.outputs[0]].shape, value.sparsity)
        else:  # DEQUANTIZE of fp16 weights: a plain, exact cast to float32
            if isinstance(value, _SparseConstant) or value.dtype != np.float16:
                raise UnsupportedModelError("DEQUANTIZE is supported for dense float16 constants only")
            constants[op.outputs[0]] = value.astype(np.float32)
    return runtime


def _check_float_activations(graph: Graph) -> None:
    for op in graph.operators:
        for index in op.inputs + op.outputs:
            if index >= 0 and index not in graph.constants and graph.tensors[index].dtype is not np.float32:
                raise UnsupportedModelError(
                    f"{op.opcode}: activation {graph.tensors[index].name} is not float32"
                )
        for index in op.inputs:
            value = graph.constants.get(index)
            if isinstance(value, _SparseConstant):
                raise UnsupportedModelError(f"{op.opcode} uses sparse tensor {graph.tensors[index].name} directly")


# ---- per-operator options -------------------------------------------------------------------

def _table(options_class: type, table: Any) -> Any:
    options = options_class()
    options.Init(table.Bytes, table.Pos)
    return options


def _conv_options(table: Any) -> dict[str, Any]:
    o = _table(tflite.Conv2DOptions, table)
    return {
        "padding": o.Padding(), "stride": (o.StrideH(), o.StrideW()),
        "dilation": (o.DilationHFactor(), o.DilationWFactor()),
        "activation": o.FusedActivationFunction(),
    }


def _depthwise_options(table: Any) -> dict[str, Any]:
    o = _table(tflite.DepthwiseConv2DOptions, table)
    return {
        "padding": o.Padding(), "stride": (o.StrideH(), o.StrideW()),
        "dilation": (o.DilationHFactor(), o.DilationWFactor()),
        "activation": o.FusedActivationFunction(), "depth_multiplier": o.DepthMultiplier(),
    }


def _pool_options(table: Any) -> dict[str, Any]:
    o = _table(tflite.Pool2DOptions, table)
    return {
        "padding": o.Padding(), "stride": (o.StrideH(), o.StrideW()),
        "kernel": (o.FilterHeight(), o.FilterWidth()), "activation": o.FusedActivationFunction(),
    }


def _add_options(table: Any) -> dict[str, Any]:
    return {"activation": _table(tflite.AddOptions, table).FusedActivationFunction()}


def _concat_options(table: Any) -> dict[str, Any]:
    o = _table(tflite.ConcatenationOptions, table)
    return {"axis": o.Axis(), "activation": o.FusedActivationFunction()}


def _resize_options(table: Any) -> dict[str, Any]:
    o = _table(tflite.ResizeBilinearOptions, table)
    return {"align_corners": bool(o.AlignCorners()), "half_pixel_centers": bool(o.HalfPixelCenters())}


def _depth_to_space_options(table: Any) -> dict[str, Any]:
    return {"block_size": _table(tflite.DepthToSpaceOptions, table).BlockSize()}


_OPTION_READERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "CONV_2D": _conv_options,
    "DEPTHWISE_CONV_2D": _depthwise_options,
    "MAX_POOL_2D": _pool_options,
    "ADD": _add_options,
    "CONCATENATION": _concat_options,
    "RESIZE_BILINEAR": _resize_options,
    "DEPTH_TO_SPACE": _depth_to_space_options,
}
