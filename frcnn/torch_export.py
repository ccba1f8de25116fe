"""The PyTorch backend's ONNX writer: :func:`write_onnx`, through ``torch.onnx.export(dynamo=True)``.

PyTorch only: imported on that backend by :mod:`frcnn.export`.

Why not Keras' own ``model.export(format="onnx")`` here: on PyTorch it traces with TorchScript whenever a dimension
is free, which runs the greedy NMS loop (:func:`frcnn.ops.greedy_keep`, a Python ``while`` on this backend) once and
records the number of steps that one sample needed, so another image would be cut short without an error; and it
falls back to that tracer silently when the dynamo exporter fails. This module calls the dynamo exporter itself and
makes three changes while it traces, none of which changes a number:

- the NMS loop becomes a ``torch.while_loop`` (an ONNX ``Loop``) with a body in plain torch (:func:`greedy_keep`):
  the exporter compiles a loop body whole, and Keras' ops make tensors from Python numbers there, which
  ``torch.onnx`` cannot decompose inside a loop (torch 2.14);
- ``aten.squeeze.dim`` is written with torch's rule (a dimension that is not 1 is left alone; :func:`_squeeze_dim`):
  onnxscript 0.7 writes an ONNX ``Squeeze`` whatever the size, which onnxruntime refuses to load. Keras' ``take`` on
  a 1-D tensor squeezes such a dimension (``frcnn.ops.gather_rows`` of scores and flags);
- the batch dimension is free, the height and width fixed (``input_size``): with free spatial sizes, Keras' ops
  turn symbolic sizes into tensors, which ``torch.export`` can only do by fixing them.
"""

import contextlib

import keras
import numpy as np
import torch

from frcnn import ops as frcnn_ops
from frcnn.export import ONNX_INPUTS, ONNX_OUTPUTS

DEFAULT_OPSET = 18


def greedy_keep(sorted_boxes, alive, max_output, iou_threshold):
    """:func:`frcnn.ops.greedy_keep` in plain torch with ``torch.while_loop``: the same steps in the same order, so
    the same kept boxes (``pairwise_iou``'s float32 arithmetic, ``divide_no_nan``'s zero for an empty union).

    Every tensor the body reads is made before the loop: a loop body must not make tensors from Python numbers
    (``torch.onnx`` cannot decompose those), nor read two views of one tensor (``torch.while_loop`` refuses
    aliased inputs)."""
    boxes = sorted_boxes.to(torch.float32)
    alive = alive.to(torch.bool)
    count = boxes.shape[1]
    positions = torch.arange(count, dtype=torch.int32, device=boxes.device)[None, :] + torch.zeros_like(
        alive, dtype=torch.int32)
    beyond = torch.full_like(positions, count)
    zero_boxes = torch.zeros_like(boxes)
    x1, y1, x2, y2 = (boxes[..., i].clone() for i in range(4))
    areas = (x2 - x1).clamp(min=0.0) * (y2 - y1).clamp(min=0.0)
    zeros, ones = torch.zeros_like(areas), torch.ones_like(areas)

    def cond(step, keep, alive):
        return (step < max_output) & alive.any()

    def body(step, keep, alive):
        first = torch.where(alive, positions, beyond).amin(dim=1)  # (B,): the best candidate still alive
        current = positions == first[:, None]
        box = torch.where(current[:, :, None], boxes, zero_boxes).sum(dim=1, keepdim=True)  # (B, 1, 4)
        bx1, by1, bx2, by2 = box.unbind(-1)
        inter = ((torch.minimum(bx2, x2) - torch.maximum(bx1, x1)).clamp(min=0.0)
                 * (torch.minimum(by2, y2) - torch.maximum(by1, y1)).clamp(min=0.0))
        union = (bx2 - bx1).clamp(min=0.0) * (by2 - by1).clamp(min=0.0) + areas - inter
        empty = union == 0
        iou = torch.where(empty, zeros, inter / torch.where(empty, ones, union))
        return step + 1, keep | current, alive & ~(current | (iou > iou_threshold))

    step = torch.zeros((), dtype=torch.int64, device=boxes.device)
    _, keep, _ = torch.while_loop(cond, body, (step, torch.zeros_like(alive), alive.clone()))
    return keep


@contextlib.contextmanager
def torch_nms_loop():
    """:func:`greedy_keep` in :mod:`frcnn.ops`' place while the block runs (the model calls it through the module)."""
    original = frcnn_ops.greedy_keep
    frcnn_ops.greedy_keep = greedy_keep
    try:
        yield
    finally:
        frcnn_ops.greedy_keep = original


def _squeeze_dim(self, dim):
    """``aten.squeeze.dim`` with torch's rule: the dimension goes only when it is 1 (ONNX ``Squeeze`` refuses
    another size). A size known at export decides here; a symbolic one at run time, through a ``Reshape``."""
    import onnx
    from onnxscript import opset18 as op

    shape = self.shape
    rank = len(shape)
    dim = dim % rank
    if isinstance(shape[dim], int):
        return op.Squeeze(self, op.Constant(value_ints=[dim])) if shape[dim] == 1 else op.Identity(self)

    def ints(values):
        return op.Constant(value_ints=list(values))

    full = op.Shape(self)
    size = op.Slice(full, ints([dim]), ints([dim + 1]))
    keep = op.Cast(op.Not(op.Equal(size, ints([1]))), to=onnx.TensorProto.INT64)  # [1]: keep it, [0]: drop it
    middle = op.Slice(full, ints([dim]), op.Add(ints([dim]), keep))
    new_shape = op.Concat(op.Slice(full, ints([0]), ints([dim])), middle, op.Slice(full, ints([dim + 1]),
                                                                                    ints([rank])), axis=0)
    return op.Reshape(self, new_shape)


class _Detector(torch.nn.Module):
    """The model with the four inputs as arguments and the four outputs as a tuple (ONNX names them)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, image_sizes, scales, original_sizes):
        out = self.model({"images": images, "image_sizes": image_sizes, "scales": scales,
                          "original_sizes": original_sizes}, training=False)
        return tuple(out[key] for key in ONNX_OUTPUTS)


def write_onnx(model, path, input_size, opset=None):
    """Write ``model`` as the ONNX file ``path``: inputs (batch, height, width, 3) with ``(height, width) =
    input_size`` fixed and the batch free. Returns the opset written."""
    height, width = input_size
    batch = 2  # a batch of 1 would be taken for a fixed size
    sample = {
        "images": np.zeros((batch, height, width, 3), np.float32),
        "image_sizes": np.tile(np.asarray([[height, width]], np.int32), (batch, 1)),
        "scales": np.ones((batch,), np.float32),
        "original_sizes": np.tile(np.asarray([[height, width]], np.int32), (batch, 1)),
    }
    args = tuple(keras.ops.convert_to_tensor(sample[key]) for key in ONNX_INPUTS)
    free = torch.export.Dim("batch", min=1)
    dynamic_shapes = tuple({0: free} for _ in ONNX_INPUTS)
    opset = int(opset or DEFAULT_OPSET)
    with torch.no_grad(), torch_nms_loop():
        program = torch.onnx.export(
            _Detector(model).eval(), args, None, dynamo=True, input_names=list(ONNX_INPUTS),
            output_names=list(ONNX_OUTPUTS), dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False,
            custom_translation_table={torch.ops.aten.squeeze.dim: _squeeze_dim})
    program.save(path, external_data=False)
    return opset
