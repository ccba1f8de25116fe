"""The operations Keras lacks, written once in ``keras.ops`` so that they run on every backend and under XLA.

- :func:`gather_rows`: ``x[b, idx[b, m]]`` for a batch (TensorFlow's ``gather(batch_dims=1)``).
- :func:`non_max_suppression`: greedy NMS, batched, padded to a static number of outputs.
- :func:`roi_align`: RoIAlign (Detectron2's ``ROIAlign(aligned=True)``), fixed or adaptive sampling, batched over
  every ROI of every image with no loop over ROIs.
- :func:`pointwise_conv` and :func:`conv_with_matmul_kernel_grad`: convolutions whose weight gradient is one
  matrix product (see :class:`frcnn.backbone.Conv2D` for why).

Shape shorthand: ``B`` batch, ``K`` candidates, ``M`` outputs, ``N`` ROIs per image, ``H, W, C`` feature map,
``P`` pooled size, ``G`` samples per bin side.
"""

from keras import ops

from frcnn import boxes as box_ops


def gather_rows(x, indices):
    """``(B, K, ...)`` and ``(B, M)`` integer indices into K -> ``(B, M, ...)``: row ``indices[b, m]`` of ``x[b]``."""
    shape = ops.shape(x)
    batch, rows = shape[0], shape[1]
    flat = ops.reshape(x, (-1,) + tuple(shape[2:]))  # (B * K, ...)
    offsets = ops.arange(batch, dtype="int32")[:, None] * ops.cast(rows, "int32")
    return ops.take(flat, ops.cast(indices, "int32") + offsets, axis=0)


# ---------------------------------------------------------------------------------------------------------- NMS


def non_max_suppression(boxes, scores, valid, max_output, iou_threshold):
    """Greedy non-maximum suppression for each row of a batch, with a static number of outputs.

    Candidates are taken in decreasing ``scores``; a candidate is kept unless a kept one overlaps it with
    IoU > ``iou_threshold`` (the rule of torchvision and Detectron2). Invalid candidates are never kept and never
    suppress anything.

    Args:
      boxes: ``(B, K, 4)`` float32 ``(x1, y1, x2, y2)``; scores: ``(B, K)``; valid: ``(B, K)`` bool.
      max_output: ``M``, a Python int: at most this many kept per row (the loop stops there).
      iou_threshold: a Python float.

    Returns:
      ``indices (B, M) int32`` into ``K`` of the kept candidates in decreasing score (0 where padded) and
      ``kept (B, M) bool``.

    Implementation: candidates sorted by score, then :func:`greedy_keep`, one ``while_loop`` step per kept box.
    """
    boxes = ops.cast(boxes, "float32")
    scores = ops.cast(scores, "float32")
    valid = ops.cast(valid, "bool")
    batch = ops.shape(boxes)[0]
    # M always-invalid candidates at the end, so that top_k(M) below has enough entries even when K < M.
    boxes = ops.concatenate([boxes, ops.zeros((batch, max_output, 4), "float32")], axis=1)
    scores = ops.concatenate([scores, ops.zeros((batch, max_output), "float32")], axis=1)
    valid = ops.concatenate([valid, ops.zeros((batch, max_output), "bool")], axis=1)
    count = ops.shape(boxes)[1]  # K + M: an int when static, else a scalar tensor (TensorFlow)

    _, order = ops.top_k(ops.where(valid, scores, float("-inf")), k=count)  # (B, K + M), decreasing score
    keep = greedy_keep(gather_rows(boxes, order), gather_rows(valid, order), max_output, iou_threshold)
    positions = ops.arange(count, dtype="int32")[None, :]
    # The first M kept positions in score order: top_k of -position over the kept ones.
    rank = ops.where(keep, -ops.cast(positions, "float32"), float("-inf"))
    rank, slots = ops.top_k(rank, k=max_output)  # (B, M)
    kept = rank > float("-inf")
    indices = ops.where(kept, gather_rows(order, slots), 0)
    return ops.cast(indices, "int32"), kept


def greedy_keep(sorted_boxes, alive, max_output, iou_threshold):
    """The loop of :func:`non_max_suppression`: ``(B, K, 4)`` boxes in decreasing score and ``(B, K)`` bool (the valid
    ones) -> ``(B, K)`` bool, the kept ones (at most ``max_output`` per row).

    One ``while_loop`` step per kept box (at most ``M`` steps): take the first candidate still alive in score order,
    keep it, and suppress the candidates that overlap it. Each step is ``O(B * K)``; no ``K x K`` IoU matrix is ever
    built, so thousands of RPN candidates cost little memory. ``frcnn.torch_export`` puts a ``torch.while_loop``
    version in its place while it traces the model for ONNX (a loop body there must be plain torch).
    """
    count = ops.shape(sorted_boxes)[1]
    positions = ops.arange(count, dtype="int32")[None, :]

    def cond(step, keep, alive):
        return ops.logical_and(step < max_output, ops.any(alive))

    def body(step, keep, alive):
        first = ops.min(ops.where(alive, positions, count), axis=1)  # (B,): the best candidate still alive
        current = ops.equal(positions, first[:, None])  # (B, K + M), all False for a row with nothing alive
        box = ops.sum(ops.where(current[:, :, None], sorted_boxes, 0.0), axis=1, keepdims=True)  # (B, 1, 4)
        overlaps = box_ops.pairwise_iou(box, sorted_boxes)[:, 0, :] > iou_threshold
        keep = ops.logical_or(keep, current)
        alive = ops.logical_and(alive, ops.logical_not(ops.logical_or(current, overlaps)))
        return step + 1, keep, alive

    _, keep, _ = ops.while_loop(cond, body, (0, ops.zeros_like(alive), alive))
    return keep


# ----------------------------------------------------------------------------------------------------- RoIAlign


def _axis_weights(start, length, size, pool, sampling_ratio):
    """Interpolation weights of RoIAlign along one axis: ``(B, N, P, size)``.

    ``start``, ``length``: ``(B, N)`` ROI start and length in feature coordinates (cell centres at integers);
    ``size``: the feature map's length on this axis. Entry ``[b, n, p, i]`` is how much feature row (or column)
    ``i`` contributes to bin ``p`` of ROI ``n``: the mean over the bin's samples of their linear interpolation
    weights, with Detectron2's border rule (a sample beyond ``[-1, size]`` counts 0, others are clamped into
    ``[0, size - 1]``). RoIAlign's 2-D bilinear sampling is the product of the two axes' weights and the
    ``gh x gw`` sample mean is the product of the two means, so a bin is ``sum_ij Wy[p, i] Wx[q, j] F[i, j]``.
    """
    size_f = ops.cast(size, "float32")
    bin_size = length / float(pool)  # (B, N)
    if sampling_ratio > 0:
        grid = sampling_ratio
        count = ops.full(ops.shape(length), float(sampling_ratio))
    else:
        # Detectron2's adaptive rule: ceil(roi length / pool size) samples per bin (no samples for an empty ROI).
        # A ROI inside the map needs at most ceil(size / pool); one more covers ROIs that reach past the border.
        grid = size // pool + 2 if isinstance(size, int) else ops.cast(size, "int32") // pool + 2
        count = ops.clip(ops.ceil(length / float(pool)), 0.0, ops.cast(grid, "float32"))
    steps = ops.cast(ops.arange(grid), "float32")  # (G,)
    bins = ops.cast(ops.arange(pool), "float32")  # (P,)
    # Sample g of bin p: start + p * bin + (g + 0.5) * bin / count, as Detectron2 computes it.
    position = (start[:, :, None, None] + bins[:, None] * bin_size[:, :, None, None]
                + (steps + 0.5) * bin_size[:, :, None, None] / ops.maximum(count, 1.0)[:, :, None, None])
    used = ops.logical_and(steps < count[:, :, None, None],
                           ops.logical_and(position >= -1.0, position <= size_f))  # (B, N, P, G)
    position = ops.clip(position, 0.0, size_f - 1.0)
    # Linear interpolation as the "hat" function max(0, 1 - |position - i|): 1 - frac for the cell below, frac for
    # the one above, 0 elsewhere, and 1 at a position clamped onto the last cell. Four elementwise ops on the large
    # (B, N, P, G, size) tensor instead of comparisons and selects; the sample mask and the mean fold into one
    # factor per sample, contracted with the hats.
    cells = ops.cast(ops.arange(size), "float32")  # (size,)
    hats = ops.relu(1.0 - ops.abs(position[..., None] - cells))  # (B, N, P, G, size)
    factor = ops.cast(used, "float32") / ops.maximum(count, 1.0)[:, :, None, None]  # (B, N, P, G)
    return ops.einsum("bnpg,bnpgs->bnps", factor, hats)


def roi_align(features, rois, pool_size, stride, sampling_ratio=0):
    """RoIAlign of ``rois (B, N, 4)`` (input pixels ``(x1, y1, x2, y2)``) on ``features (B, H, W, C)``.

    Returns ``(B, N, P, P, C)`` in the dtype of ``features``. Convention: Detectron2's ``ROIAlign(aligned=True)``
    (ROIAlignV2): pixel coordinate ``u`` is feature coordinate ``u / stride - 0.5``; each of the ``P x P`` bins is
    the mean of ``G x G`` bilinear samples at the centres of a regular sub-grid, ``G = sampling_ratio``, or with
    ``sampling_ratio = 0`` Detectron2's adaptive ``ceil(roi side / P)`` per ROI and axis.

    Computed as two matrix products per ROI, ``Wy (P x H) . F (H x W x C) . Wx^T (W x P)``, with the interpolation
    matrices of :func:`_axis_weights`: exact (the sampling is separable), every ROI of the batch at once, XLA
    friendly, and its gradient with respect to the features is two more matrix products (no scatter). The larger
    intermediate is ``(B, N, P, min(H, W), C)``: about 650 MB in float32 for 300 ROIs on a 600 x 1000 image.
    """
    rois = ops.stop_gradient(ops.cast(rois, "float32"))
    shape = ops.shape(features)
    _, height, width, channels = shape
    num_rois = ops.shape(rois)[1]
    pool = int(pool_size)
    scale = 1.0 / float(stride)
    x1 = rois[..., 0] * scale - 0.5
    y1 = rois[..., 1] * scale - 0.5
    x2 = rois[..., 2] * scale - 0.5
    y2 = rois[..., 3] * scale - 0.5
    wy = ops.cast(_axis_weights(y1, y2 - y1, height, pool, sampling_ratio), features.dtype)  # (B, N, P, H)
    wx = ops.cast(_axis_weights(x1, x2 - x1, width, pool, sampling_ratio), features.dtype)  # (B, N, P, W)
    if isinstance(height, int) and isinstance(width, int) and width > height:
        # Contract the longer axis (W) first: the intermediate holds H, the shorter side.
        by_column = ops.reshape(ops.transpose(features, (0, 2, 1, 3)), (-1, width, height * channels))
        t = ops.matmul(ops.reshape(wx, (-1, num_rois * pool, width)), by_column)  # (B, N * P, H * C)
        t = ops.reshape(t, (-1, num_rois, pool, height, channels))  # (B, N, Q, H, C)
        out = ops.matmul(wy[:, :, None], t)  # (B, N, 1, P, H) @ (B, N, Q, H, C) -> (B, N, Q, P, C)
        return ops.transpose(out, (0, 1, 3, 2, 4))
    t = ops.matmul(ops.reshape(wy, (-1, num_rois * pool, height)), ops.reshape(features, (-1, height, width * channels)))
    t = ops.reshape(t, (-1, num_rois, pool, width, channels))  # (B, N, P, W, C)
    return ops.matmul(wx[:, :, None], t)  # (B, N, 1, Q, W) @ (B, N, P, W, C) -> (B, N, P, Q, C)


# ------------------------------------------------------------------------------ convolutions as matrix products


def pointwise_conv(x, kernel, stride=1):
    """A 1x1 convolution (``padding`` valid or same: the same for 1x1) as what it is, a matrix product over the
    channels: ``(B, H, W, Cin)``, kernel ``(1, 1, Cin, Cout)`` -> ``(B, ceil(H / stride), ceil(W / stride), Cout)``.
    A stride keeps every ``stride``-th row and column first, which is what the strided convolution reads (as a
    1x1 average pool: the same values, and faster than a strided slice, forwards and backwards, in TensorFlow's
    bfloat16 on a CPU; docs/NOTES.md). Its gradients are matrix products too (``x^T dy`` for the kernel)."""
    if stride > 1:
        x = ops.average_pool(x, pool_size=1, strides=stride, padding="valid")
    return ops.einsum("bhwc,cd->bhwd", x, kernel[0, 0])


def _patches(x, size):
    """``(B, H, W, C)`` -> ``(B, H, W, size * size * C)``: each position's ``size x size`` neighbourhood (zero
    padded, stride 1, "same"), ordered as a ``(size, size, C, ...)`` kernel is flattened."""
    pad = size // 2
    height = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
    width = x.shape[2] if x.shape[2] is not None else ops.shape(x)[2]
    padded = ops.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return ops.concatenate(
        [padded[:, i:i + height, j:j + width, :] for i in range(size) for j in range(size)], axis=-1)


def conv_with_matmul_kernel_grad(x, kernel):
    """A stride-1 "same" ``k x k`` convolution (odd ``k``) whose forward pass and input
    gradient are the backend's own convolutions and whose kernel gradient is one matrix product,
    ``patches(x)^T dy``. Same values and gradients as ``ops.conv(x, kernel, padding="same")``."""
    size = kernel.shape[0]
    # A tensor, not the variable (float32 policy): TensorFlow's custom_gradient refuses functions that read
    # variables unless they return the variables' gradients separately. Keras' convert_to_tensor returns a variable
    # as it is; a copy is a tensor (and costs nothing next to the convolution).
    kernel = ops.copy(kernel)

    @ops.custom_gradient
    def conv(x, kernel):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            grad_x = ops.conv_transpose(upstream, kernel, strides=1, padding="same")
            grad_kernel = ops.einsum("bhwk,bhwd->kd", _patches(x, size), upstream)
            return grad_x, ops.reshape(grad_kernel, ops.shape(kernel))

        return ops.conv(x, kernel, strides=1, padding="same"), grad

    return conv(x, kernel)


# ------------------------------------------------------------------------------------------------ group norm


def _per_group(values, groups):
    """``(B, C)`` -> ``(B, G)``: the mean over each group's ``C / G`` channels."""
    return ops.mean(ops.reshape(values, (ops.shape(values)[0], groups, -1)), axis=-1)


def _per_channel(values, channels):
    """``(B, G)`` -> ``(B, C)``: each group's value repeated for its ``C / G`` channels."""
    groups = values.shape[-1]
    return ops.reshape(ops.repeat(values[:, :, None], channels // groups, axis=2), (-1, channels))


def group_norm(x, gamma, beta, groups, epsilon):
    """Group normalisation of a channels-last ``(B, H, W, C)`` tensor (Wu & He, 2018): each sample's channels are
    split into ``groups`` groups, each normalised by its mean and variance over ``H, W`` and its channels, then
    scaled by ``gamma`` and shifted by ``beta`` (``(C,)`` each).

    The same values as ``keras.layers.GroupNormalization``, computed in fewer passes over the activation: the
    statistics are float32 sums of per-channel means; the normalisation is one multiply-add per element in the
    input's dtype (``x * scale + shift`` with per-sample, per-channel ``scale`` and ``shift``, as for a frozen
    BatchNorm); the gradient is written out (``dx = dy * scale + x * a + b`` with per-sample, per-group ``a``,
    ``b``) instead of derived through the reductions. Statistics and parameter gradients stay float32 under mixed
    precision; the outputs and ``dx`` have the input's dtype.
    """
    dtype = x.dtype
    channels = x.shape[-1]
    gamma = ops.cast(gamma, "float32")
    beta = ops.cast(beta, "float32")

    def per_pixel(values):
        return ops.cast(values[:, None, None, :], dtype)

    @ops.custom_gradient
    def norm(x, gamma, beta):
        xf = ops.cast(x, "float32")
        mean = _per_group(ops.mean(xf, axis=(1, 2)), groups)  # (B, G)
        variance = ops.maximum(_per_group(ops.mean(ops.square(xf), axis=(1, 2)), groups) - ops.square(mean), 0.0)
        inv_std = ops.rsqrt(variance + epsilon)
        inv_std_c, mean_c = _per_channel(inv_std, channels), _per_channel(mean, channels)  # (B, C)
        scale = gamma * inv_std_c
        shift = beta - mean_c * scale

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            dy = ops.cast(upstream, "float32")
            sum_dy = ops.sum(dy, axis=(1, 2))  # (B, C)
            # x cast again rather than the forward's float32 copy kept: one pass here instead of a float32 copy of
            # every normalised activation held until the backward pass.
            sum_dy_x = ops.sum(dy * ops.cast(x, "float32"), axis=(1, 2))
            grad_beta = ops.sum(sum_dy, axis=0)
            grad_gamma = ops.sum((sum_dy_x - mean_c * sum_dy) * inv_std_c, axis=0)
            # dx = inv_std * (gamma dy - mean_g(gamma dy) - x_hat * mean_g(gamma dy x_hat)), the means over each
            # group's pixels and channels; expanded, dx = dy * scale + x * a + b per sample and group.
            count = ops.cast(ops.shape(x)[1] * ops.shape(x)[2], "float32")
            g_dy = _per_group(gamma * sum_dy, groups) / count  # mean_g(gamma dy)  (B, G)
            g_dy_x = _per_group(gamma * sum_dy_x, groups) / count  # mean_g(gamma dy x)
            a = -ops.power(inv_std, 3) * (g_dy_x - mean * g_dy)
            b = -a * mean - inv_std * g_dy
            grad_x = (upstream * per_pixel(scale) + x * per_pixel(_per_channel(a, channels))
                      + per_pixel(_per_channel(b, channels)))
            return grad_x, grad_gamma, grad_beta

        return x * per_pixel(scale) + per_pixel(shift), grad

    return norm(x, gamma, beta)
