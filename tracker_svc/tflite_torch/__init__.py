"""A small TFLite interpreter in PyTorch, for the two BlazePose graphs.

    load_tflite(path, device, outputs=..., channels_last=...) -> TFLiteModule
    TFLiteModule(x_nchw) -> tuple of outputs in TFLite layout (NHWC for 4-D)

Supported: PAD, CONV_2D, DEPTHWISE_CONV_2D, ADD, MAX_POOL_2D, RESIZE_BILINEAR, DEPTH_TO_SPACE,
RESHAPE, CONCATENATION, LOGISTIC with fused activations, plus DEQUANTIZE (fp16) and DENSIFY on
constants, folded at load time. Anything else raises UnsupportedModelError when the file is read.

Modules: `flatbuffer` reads the file into a Graph, `densify` decodes sparse weights, `ops` holds
the torch operators, `module` assembles and runs them.
"""

from tracker_svc.tflite_torch.flatbuffer import Graph, read_graph
from tracker_svc.tflite_torch.module import TFLiteModule, load_tflite

__all__ = ["Graph", "TFLiteModule", "load_tflite", "read_graph"]
