"""TFLite operators as torch modules working on NCHW activations.

Each step reads its input tensors from the interpreter's environment and writes one output. 4-D
activations are held as NCHW torch tensors (channels_last memory on the CPU); operators whose
semantics are defined on TFLite's NHWC layout (RESHAPE, DEPTH_TO_SPACE) view the tensor as NHWC
first, so the result is bit-for-bit the layout TFLite would produce.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tracker_svc.errors import UnsupportedModelError


class Padding(IntEnum):  # schema `Padding`
    SAME = 0
    VALID = 1


class Activation(IntEnum):  # schema `ActivationFunctionType`
    NONE = 0
    RELU = 1
    RELU_N1_TO_1 = 2
    RELU6 = 3
    TANH = 4


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TFLite SAME padding for one spatial dimension: (before, after); the odd pixel goes after."""
    out = math.ceil(size / stride)
    effective_kernel = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective_kernel - size, 0)
    return total // 2, total - total // 2


def apply_activation_(x: Tensor, activation: int) -> Tensor:
    """Applies a fused activation in place (x is always a fresh op output here)."""
    if activation == Activation.NONE:
        return x
    if activation == Activation.RELU:
        return x.clamp_(min=0.0)
    if activation == Activation.RELU_N1_TO_1:
        return x.clamp_(-1.0, 1.0)
    if activation == Activation.RELU6:
        return x.clamp_(0.0, 6.0)
    if activation == Activation.TANH:
        return x.tanh_()
    raise UnsupportedModelError(f"fused activation {activation} is not supported")


def check_activation(activation: int) -> int:
    if activation not in set(Activation):
        raise UnsupportedModelError(f"fused activation {activation} is not supported")
    return activation


def nchw_to_nhwc(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


def nhwc_to_nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


class Step(nn.Module):
    """One operator: reads `inputs` (tensor indices) from the environment, produces `output`."""

    def __init__(self, inputs: tuple[int, ...], output: int) -> None:
        super().__init__()
        self.inputs = inputs
        self.output = output


class Conv2d(Step):
    """CONV_2D and DEPTHWISE_CONV_2D (groups = input channels), padding already resolved.

    `pad` is (top, bottom, left, right). Symmetric padding goes to the convolution itself;
    asymmetric SAME padding (stride 2, even input) needs an explicit zero pad first.
    """

    def __init__(
        self, inputs: tuple[int, ...], output: int, weight: Tensor, bias: Tensor | None,
        stride: tuple[int, int], dilation: tuple[int, int], pad: tuple[int, int, int, int],
        groups: int, activation: int,
    ) -> None:
        super().__init__(inputs, output)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.activation = check_activation(activation)
        top, bottom, left, right = pad
        if top == bottom and left == right:
            self.explicit_pad: tuple[int, int, int, int] | None = None
            self.conv_pad = (top, left)
        else:
            self.explicit_pad = (left, right, top, bottom)
            self.conv_pad = (0, 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.conv_pad, self.dilation, self.groups)
        return apply_activation_(y, self.activation)


class Pad(Step):
    """PAD with zeros on the spatial dims of a 4-D tensor (pads given in NHWC order)."""

    def __init__(self, inputs: tuple[int, ...], output: int, pads_nhwc: list[list[int]]) -> None:
        super().__init__(inputs, output)
        (n0, n1), (h0, h1), (w0, w1), (c0, c1) = pads_nhwc
        if n0 or n1:
            raise UnsupportedModelError("PAD on the batch dimension is not supported")
        self.pad = (w0, w1, h0, h1, c0, c1)  # F.pad order: last dim (W) first, then H, then C

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pad)


class Add(Step):
    def __init__(self, inputs: tuple[int, ...], output: int, activation: int) -> None:
        super().__init__(inputs, output)
        self.activation = check_activation(activation)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return apply_activation_(a + b, self.activation)


class MaxPool2d(Step):
    def __init__(
        self, inputs: tuple[int, ...], output: int, kernel: tuple[int, int],
        stride: tuple[int, int], pad: tuple[int, int, int, int], activation: int,
    ) -> None:
        super().__init__(inputs, output)
        self.kernel, self.stride = kernel, stride
        top, bottom, left, right = pad
        self.pad = (left, right, top, bottom) if any(pad) else None
        self.activation = check_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad is not None:
            # SAME max pooling ignores the border: pad with -inf so it never wins.
            x = F.pad(x, self.pad, value=float("-inf"))
        return apply_activation_(F.max_pool2d(x, self.kernel, self.stride), self.activation)


class ResizeBilinear(Step):
    def __init__(
        self, inputs: tuple[int, ...], output: int, size: tuple[int, int],
        align_corners: bool, half_pixel_centers: bool,
    ) -> None:
        super().__init__(inputs, output)
        if align_corners == half_pixel_centers:
            # Both true is invalid in TFLite; both false (the legacy TF1 rule) has no torch equivalent.
            raise UnsupportedModelError(
                f"RESIZE_BILINEAR with align_corners={align_corners}, "
                f"half_pixel_centers={half_pixel_centers} is not supported"
            )
        self.size, self.align_corners = size, align_corners

    def forward(self, x: Tensor) -> Tensor:
        # half_pixel_centers == torch's align_corners=False (source index clamped at 0 in both).
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=self.align_corners)


class DepthToSpace(Step):
    """TFLite DEPTH_TO_SPACE (DCR order): out[n, h·b + i, w·b + j, c] = in[n, h, w, (i·b + j)·C + c]."""

    def __init__(self, inputs: tuple[int, ...], output: int, block_size: int) -> None:
        super().__init__(inputs, output)
        self.block = block_size

    def forward(self, x: Tensor) -> Tensor:
        return depth_to_space_nchw(x, self.block)


def depth_to_space_nchw(x: Tensor, block: int) -> Tensor:
    n, c, h, w = x.shape
    out_c = c // (block * block)
    # On channels_last memory the NHWC view is contiguous, so this is a single copy.
    nhwc = nchw_to_nhwc(x).reshape(n, h, w, block, block, out_c)
    nhwc = nhwc.permute(0, 1, 3, 2, 4, 5).reshape(n, h * block, w * block, out_c)
    return nhwc_to_nchw(nhwc)


class Reshape(Step):
    """RESHAPE with the batch dimension kept: the TFLite shape's leading 1 (or -1) becomes N."""

    def __init__(self, inputs: tuple[int, ...], output: int, in_rank: int, out_shape: tuple[int, ...]) -> None:
        super().__init__(inputs, output)
        if not out_shape or out_shape[0] not in (1, -1):
            raise UnsupportedModelError(f"RESHAPE to {out_shape} does not keep the batch dimension")
        self.in_rank, self.rest = in_rank, tuple(out_shape[1:])

    def forward(self, x: Tensor) -> Tensor:
        if self.in_rank == 4:
            x = nchw_to_nhwc(x)  # TFLite flattens in NHWC order
        y = x.reshape(x.shape[0], *self.rest)
        return nhwc_to_nchw(y) if y.dim() == 4 else y


class Concatenation(Step):
    # TFLite NHWC axis → our NCHW axis for 4-D tensors.
    _NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}

    def __init__(self, inputs: tuple[int, ...], output: int, axis: int, rank: int, activation: int) -> None:
        super().__init__(inputs, output)
        axis = axis % rank
        if axis == 0:
            raise UnsupportedModelError("CONCATENATION along the batch axis is not supported")
        self.dim = self._NHWC_TO_NCHW_AXIS[axis] if rank == 4 else axis
        self.activation = check_activation(activation)

    def forward(self, *xs: Tensor) -> Tensor:
        return apply_activation_(torch.cat(xs, dim=self.dim), self.activation)


class Logistic(Step):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)
