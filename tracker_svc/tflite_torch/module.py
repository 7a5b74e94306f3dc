"""Turn a `Graph` into an `nn.Module` that runs it batched on any torch device.

The module takes the graph's input as an NCHW float32 batch and returns the requested outputs in
TFLite's layout (NHWC for 4-D outputs), so results compare directly with LiteRT's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from tracker_svc.errors import UnsupportedModelError
from tracker_svc.tflite_torch import ops
from tracker_svc.tflite_torch.flatbuffer import Graph, Operator, read_graph


class TFLiteModule(nn.Module):
    """Executes a TFLite graph with torch ops, batched over the leading dimension."""

    def __init__(self, graph: Graph, outputs: Sequence[str] | None = None) -> None:
        super().__init__()
        names = {graph.tensors[i].name: i for i in graph.outputs}
        wanted = list(names) if outputs is None else list(outputs)
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ValueError(f"unknown outputs {unknown}; the graph has {list(names)}")
        if len(graph.inputs) != 1:
            raise UnsupportedModelError(f"graph has {len(graph.inputs)} inputs, expected 1")
        self.output_names: tuple[str, ...] = tuple(wanted)
        self.input_index = graph.inputs[0]
        self.input_shape_nhwc: tuple[int, ...] = graph.tensors[self.input_index].shape
        self.output_indices = tuple(names[n] for n in wanted)
        self.output_ranks = tuple(len(graph.tensors[i].shape) for i in self.output_indices)
        operators = _prune(graph.operators, self.output_indices)
        self.steps = nn.ModuleList(_build_steps(graph, operators))
        self.release_after = _last_uses(self.steps, self.output_indices)
        self.channels_last = False  # set by load_tflite; inputs are converted to match the weights

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """x: (N, C, H, W) float32. Returns the selected outputs, 4-D ones as NHWC."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        env: dict[int, Tensor] = {self.input_index: x}
        for step, release in zip(self.steps, self.release_after):
            env[step.output] = step(*(env[i] for i in step.inputs))
            for index in release:  # drop activations nobody reads again: bounds peak memory
                del env[index]
        return tuple(
            ops.nchw_to_nhwc(env[i]) if rank == 4 else env[i]
            for i, rank in zip(self.output_indices, self.output_ranks)
        )


def load_tflite(
    path: Path | str,
    device: torch.device | str = "cpu",
    *,
    outputs: Sequence[str] | None = None,
    channels_last: bool | None = None,
) -> TFLiteModule:
    """Reads a .tflite file into an eval-mode TFLiteModule on `device`.

    outputs: names of the graph outputs to compute (operators only they need are pruned);
      all, in graph order, when None.
    channels_last: memory format of the 4-D weights and activations; defaults to True on the CPU,
      where oneDNN's depthwise convolutions are several times faster in it.
    """
    device = torch.device(device)
    module = TFLiteModule(read_graph(path), outputs).eval().to(device)
    if channels_last is None:
        channels_last = device.type == "cpu"
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        module.channels_last = True
    module.requires_grad_(False)
    return module


def _prune(operators: list[Operator], outputs: Sequence[int]) -> list[Operator]:
    """Keeps only the operators the requested outputs depend on (e.g. skips segmentation)."""
    needed = set(outputs)
    kept: list[Operator] = []
    for op in reversed(operators):
        if needed.intersection(op.outputs):
            kept.append(op)
            needed.update(i for i in op.inputs if i >= 0)
    return kept[::-1]


def _build_steps(graph: Graph, operators: list[Operator]) -> list[ops.Step]:
    consumers = Counter(i for op in operators for i in op.inputs)
    producer_pads = _foldable_pads(graph, operators, consumers)
    steps: list[ops.Step] = []
    for op in operators:
        if op.opcode == "PAD" and op.outputs[0] in producer_pads:
            continue  # folded into the convolution that reads it
        steps.append(_build_step(graph, op, producer_pads))
    return steps


_FoldedPads = dict[int, tuple[int, tuple[int, int, int, int]]]  # PAD output → (PAD input, t, b, l, r)


def _foldable_pads(graph: Graph, operators: list[Operator], consumers: Counter[int]) -> _FoldedPads:
    """Zero PADs read only by one convolution: map pad output → (pad input, (t, b, l, r)).

    Folding saves a full copy of a large activation per stride-2 block.
    """
    conv_inputs = {op.inputs[0] for op in operators if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D")}
    folded = {}
    for op in operators:
        if op.opcode != "PAD" or op.outputs[0] not in conv_inputs or consumers[op.outputs[0]] != 1:
            continue
        if op.outputs[0] in graph.outputs:
            continue
        (n0, n1), (h0, h1), (w0, w1), (c0, c1) = _constant(graph, op.inputs[1]).tolist()
        if n0 == n1 == c0 == c1 == 0:
            folded[op.outputs[0]] = (op.inputs[0], (h0, h1, w0, w1))
    return folded


def _build_step(graph: Graph, op: Operator, folded_pads: _FoldedPads) -> ops.Step:
    out = op.outputs[0]
    if len(op.outputs) != 1:
        raise UnsupportedModelError(f"{op.opcode} with {len(op.outputs)} outputs is not supported")
    if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        return _conv_step(graph, op, folded_pads)
    if op.opcode == "PAD":
        return ops.Pad((op.inputs[0],), out, _constant(graph, op.inputs[1]).tolist())
    if op.opcode == "ADD":
        _require_runtime_inputs(graph, op)
        return ops.Add(op.inputs, out, op.options["activation"])
    if op.opcode == "MAX_POOL_2D":
        return _pool_step(graph, op)
    if op.opcode == "RESIZE_BILINEAR":
        size = tuple(int(s) for s in _constant(graph, op.inputs[1]))
        return ops.ResizeBilinear((op.inputs[0],), out, size, **op.options)  # type: ignore[arg-type]
    if op.opcode == "DEPTH_TO_SPACE":
        return ops.DepthToSpace((op.inputs[0],), out, op.options["block_size"])
    if op.opcode == "RESHAPE":
        shape = tuple(int(s) for s in _constant(graph, op.inputs[1]))
        return ops.Reshape((op.inputs[0],), out, len(graph.tensors[op.inputs[0]].shape), shape)
    if op.opcode == "CONCATENATION":
        _require_runtime_inputs(graph, op)
        rank = len(graph.tensors[out].shape)
        return ops.Concatenation(op.inputs, out, op.options["axis"], rank, op.options["activation"])
    if op.opcode == "LOGISTIC":
        return ops.Logistic((op.inputs[0],), out)
    raise UnsupportedModelError(f"operator {op.opcode} is not supported")


def _conv_step(graph: Graph, op: Operator, folded_pads: _FoldedPads) -> ops.Conv2d:
    source, weight_index = op.inputs[0], op.inputs[1]
    bias_index = op.inputs[2] if len(op.inputs) > 2 else -1
    weight = _constant(graph, weight_index)
    opts = op.options
    _, in_h, in_w, in_c = graph.tensors[source].shape
    if op.opcode == "CONV_2D":
        filters = torch.from_numpy(weight).permute(0, 3, 1, 2)  # OHWI → OIHW
        groups = in_c // weight.shape[3]
        if groups != 1:
            raise UnsupportedModelError("grouped CONV_2D is not supported")
    else:
        if opts["depth_multiplier"] * in_c != weight.shape[3]:
            raise UnsupportedModelError("DEPTHWISE_CONV_2D depth multiplier does not match the filter")
        filters = torch.from_numpy(weight)[0].permute(2, 0, 1).unsqueeze(1)  # 1HW(C·m) → (C·m)1HW
        groups = in_c
    kh, kw = filters.shape[2], filters.shape[3]
    pad = _window_padding(opts["padding"], (in_h, in_w), (kh, kw), opts["stride"], opts["dilation"])
    if source in folded_pads:
        source, (pt, pb, pl, pr) = folded_pads[source]
        pad = (pad[0] + pt, pad[1] + pb, pad[2] + pl, pad[3] + pr)
    bias = torch.from_numpy(_constant(graph, bias_index).copy()) if bias_index >= 0 else None
    return ops.Conv2d(
        (source,), op.outputs[0], filters.contiguous().clone(), bias, opts["stride"],
        opts["dilation"], pad, groups, opts["activation"],
    )


def _pool_step(graph: Graph, op: Operator) -> ops.MaxPool2d:
    _, in_h, in_w, _ = graph.tensors[op.inputs[0]].shape
    opts = op.options
    pad = _window_padding(opts["padding"], (in_h, in_w), opts["kernel"], opts["stride"], (1, 1))
    return ops.MaxPool2d((op.inputs[0],), op.outputs[0], opts["kernel"], opts["stride"], pad, opts["activation"])


def _window_padding(
    padding: int, size: tuple[int, int], kernel: tuple[int, int],
    stride: tuple[int, int], dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    if padding == ops.Padding.VALID:
        return (0, 0, 0, 0)
    if padding != ops.Padding.SAME:
        raise UnsupportedModelError(f"padding mode {padding} is not supported")
    top, bottom = ops.same_padding(size[0], kernel[0], stride[0], dilation[0])
    left, right = ops.same_padding(size[1], kernel[1], stride[1], dilation[1])
    return (top, bottom, left, right)


def _constant(graph: Graph, index: int) -> np.ndarray:
    if index not in graph.constants:
        raise UnsupportedModelError(f"tensor {graph.tensors[index].name} must be a constant")
    return graph.constants[index]


def _require_runtime_inputs(graph: Graph, op: Operator) -> None:
    if any(i in graph.constants for i in op.inputs):
        raise UnsupportedModelError(f"{op.opcode} with a constant operand is not supported")


def _last_uses(steps: nn.ModuleList, keep: Sequence[int]) -> list[tuple[int, ...]]:
    """For each step, the tensors read for the last time there (and not outputs)."""
    last: dict[int, int] = {}
    for position, step in enumerate(steps):
        for index in step.inputs:
            last[index] = position
    release: list[list[int]] = [[] for _ in steps]
    for index, position in last.items():
        if index not in keep:
            release[position].append(index)
    return [tuple(r) for r in release]
