"""Export a trained detector, on whatever backend Keras runs: what ``frcnn-export`` (``tools/export.py``) calls.

Two formats, each written as a folder (``--out``):

``saved_model`` (TensorFlow backend only, :mod:`frcnn.tf_export`): a TensorFlow SavedModel that takes encoded
    images and does the preprocessing in its graph.
``onnx`` (TensorFlow and PyTorch backends): ``model.onnx``, the model itself. It takes the model's own inputs, a
    batch already preprocessed by the model's ``transform`` (:meth:`frcnn.transform.ImageTransform.prepare_batch`:
    resize so that the shorter side is ``min_size`` and the longer at most ``max_size``, bilinear, then zero padding
    bottom / right to a multiple of ``size_divisibility``; the mean / std normalisation is inside the model). The
    caller does that step: ``model.json`` beside it holds the transform's config and the class names (so does the
    ONNX file's own metadata, key ``frcnn``), and ``config.yaml`` the full resolved config.

    Inputs (:data:`ONNX_INPUTS`): ``images`` (B, H, W, 3) float32 RGB pixels 0..255, ``image_sizes`` (B, 2) int32
    (height, width of each resized image inside the padding), ``scales`` (B,) float32 (resized / original) and
    ``original_sizes`` (B, 2) int32; exactly the four arrays ``prepare_batch`` returns. Outputs
    (:data:`ONNX_OUTPUTS`): ``boxes`` (B, D, 4) float32 ``(x1, y1, x2, y2)`` in original pixels, ``scores`` (B, D),
    ``classes`` (B, D) int32 (1..C-1, 0 in padding rows), ``num_detections`` (B,) int32, as
    ``model.predict_on_batch`` returns them.

    Shapes: from TensorFlow (tf2onnx) the batch, height and width are free. From PyTorch (``torch.onnx``'s dynamo
    exporter) the batch is free but the height and width are fixed at export (``input_size``, default the largest
    padded size the transform can give, ``max_size`` rounded up to ``size_divisibility``, square): pad the batch of
    ``prepare_batch`` further to that size with zeros (:func:`pad_batch`), which is how ``input.fixed_size``
    batches are made.

Not available, and why (:func:`check_format` says so with the fix): a SavedModel from JAX or PyTorch (it is built
from TensorFlow graph functions); ONNX from JAX (Keras converts JAX with jax2onnx, which does not convert this
model; its other route, jax2tf, needs TensorFlow). The checkpoint is the same file on every backend, so export on
TensorFlow or PyTorch.

After writing, the ONNX file is run with onnxruntime (when installed) on a synthetic batch and its detections are
compared with the model's own (:func:`compare_detections`); a file that disagrees is not put in place.
"""

import importlib.util
import json
import os

import numpy as np

from frcnn.config import ConfigError, class_name_problem, save_config
from frcnn.fileio import release_temporary, remove_orphaned_directories, temporary_directory
from frcnn.transform import padded_side

FORMATS = ("saved_model", "onnx")
ONNX_FILE = "model.onnx"
META_FILE = "model.json"
CONFIG_FILE = "config.yaml"
ONNX_INPUTS = ("images", "image_sizes", "scales", "original_sizes")
ONNX_OUTPUTS = ("boxes", "scores", "classes", "num_detections")
METADATA_KEY = "frcnn"  # the ONNX file's metadata_props entry holding model.json's content
_TMP_PREFIX = ".export-"  # the export being written, beside --out
_OLD_PREFIX = ".old-export-"  # the export being replaced
_MARKERS = ("saved_model.pb", ONNX_FILE)  # a folder holding one of these is an earlier export, replaced

# What each backend needs for ONNX: (import name, pip name).
_ONNX_NEEDS = {
    "tensorflow": (("tf2onnx", "tf2onnx"), ("onnx", "onnx")),
    "torch": (("onnx", "onnx"), ("onnxscript", "onnxscript")),
}


class ExportError(RuntimeError):
    """An export that cannot be made here (the message says what is missing and what to do), or an exported file
    whose detections differ from the model's."""


def default_format(backend):
    """``saved_model`` on TensorFlow, ``onnx`` elsewhere."""
    return "saved_model" if backend == "tensorflow" else "onnx"


def missing_packages(backend):
    """The pip names of the packages ONNX export needs on ``backend`` that cannot be imported here."""
    return [pip for module, pip in _ONNX_NEEDS.get(backend, ()) if importlib.util.find_spec(module) is None]


def check_format(fmt, backend):
    """Raise :class:`ExportError` saying what is missing when ``fmt`` cannot be exported on ``backend``."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    same_file = "(the checkpoint is the same file on every backend)"
    if fmt == "saved_model" and backend != "tensorflow":
        raise ExportError(
            f"SavedModel export needs the TensorFlow backend (KERAS_BACKEND=tensorflow, pip install "
            f"'frcnn[tensorflow]') {same_file}; on {backend}, export ONNX: --format onnx")
    if fmt == "onnx" and backend == "jax":
        raise ExportError(
            "ONNX export is not available on the JAX backend: Keras converts JAX models with jax2onnx, which does "
            "not convert this one (docs/NOTES.md, Session 8), and its other route, jax2tf, needs TensorFlow. Run "
            f"the export on PyTorch or TensorFlow instead {same_file}: KERAS_BACKEND=torch frcnn-export "
            "--format onnx ...")
    if fmt == "onnx" and backend not in _ONNX_NEEDS:
        raise ExportError(f"ONNX export is not available on the {backend} backend; use tensorflow or torch")
    if fmt == "onnx":
        missing = missing_packages(backend)
        if missing:
            raise ExportError(
                f"ONNX export on the {backend} backend needs {' and '.join(missing)}: pip install 'frcnn[onnx]' "
                f"(or pip install {' '.join(missing)})")


def padded_canvas(transform):
    """The largest padded ``(height, width)`` :meth:`ImageTransform.prepare_batch` can give: ``max_size`` rounded
    up to ``size_divisibility``, both sides."""
    side = padded_side(transform.size_divisibility, int(transform.max_size))
    return side, side


def check_input_size(transform, input_size):
    """``input_size`` (height, width) checked, or the default :func:`padded_canvas`."""
    if input_size is None:
        return padded_canvas(transform)
    height, width = (int(v) for v in input_size)
    divisor = transform.size_divisibility
    if height < divisor or width < divisor or height % divisor or width % divisor:
        raise ConfigError(f"--input-size {height} {width}: both sides must be positive multiples of "
                          f"input.size_divisibility ({divisor})")
    return height, width


def pad_batch(batch, height, width):
    """A batch of :meth:`ImageTransform.prepare_batch` with its ``images`` padded with zeros (bottom / right) to
    ``(height, width)``; the other arrays are unchanged. ``ValueError`` when an image is larger."""
    images = np.asarray(batch["images"], np.float32)
    if images.shape[1] > height or images.shape[2] > width:
        raise ValueError(f"the batch is {images.shape[1]} x {images.shape[2]}, larger than the model's fixed input "
                         f"{height} x {width}; export with a larger --input-size or lower input.max_size")
    padded = np.zeros((images.shape[0], height, width, 3), np.float32)
    padded[:, : images.shape[1], : images.shape[2]] = images
    return {**batch, "images": padded}


def onnx_metadata(model, backend, input_size=None, opset=None):
    """What ``model.json`` (and the ONNX file's metadata) says: class names, the transform, inputs and outputs."""
    from frcnn import __version__

    height, width = input_size if input_size is not None else (None, None)
    return {
        "format": "frcnn-onnx",
        "frcnn_version": __version__,
        "exported_on": backend,
        "opset": opset,
        "class_names": list(model.class_names),
        "transform": model.transform.get_config(),
        "preprocessing": (
            "frcnn.transform.ImageTransform(**transform).prepare_batch(list of HxWx3 uint8 RGB arrays): one scale "
            "per image, min(min_size / shorter side, max_size / longer side), resized sides floor(side * scale + "
            "0.5), bilinear; zero padding bottom / right to a multiple of size_divisibility (to max_size rounded up "
            "with fixed_size)" + (f", then further to {height} x {width}, the fixed input size" if height else "")
            + ". The mean / std normalisation is inside the model."),
        "inputs": {
            "images": {"dtype": "float32", "shape": ["batch", height or "height", width or "width", 3]},
            "image_sizes": {"dtype": "int32", "shape": ["batch", 2]},
            "scales": {"dtype": "float32", "shape": ["batch"]},
            "original_sizes": {"dtype": "int32", "shape": ["batch", 2]},
        },
        "outputs": {
            "boxes": "(batch, D, 4) float32 x1, y1, x2, y2 in original image pixels",
            "scores": "(batch, D) float32",
            "classes": "(batch, D) int32 index into class_names (0, the background, in padding rows)",
            "num_detections": "(batch,) int32: the rows of image i are [:num_detections[i]]",
        },
        "fixed_input_size": [height, width] if height else None,
    }


# ------------------------------------------------------------------------------------------------ the folder


def write_export_folder(out_dir, write):
    """Call ``write(tmp)`` to fill a new folder beside ``out_dir``, then move it into place; returns the absolute
    path.

    An interrupted export leaves no half-written folder at ``out_dir`` (and the next export removes the temporary
    folder of one that was killed). An existing earlier export (a SavedModel or an ONNX export) or empty folder at
    ``out_dir`` is replaced; any other existing path is refused with ``FileExistsError``.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        is_export = any(os.path.isfile(os.path.join(out_dir, name)) for name in _MARKERS)
        if not os.path.isdir(out_dir) or (os.listdir(out_dir) and not is_export):
            raise FileExistsError(f"{out_dir} exists and is not an export folder; choose another output folder")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_orphaned_directories(parent, _TMP_PREFIX)  # left by an export that was killed
    remove_orphaned_directories(parent, _OLD_PREFIX)
    with temporary_directory(parent, _TMP_PREFIX) as tmp:
        write(tmp)
        os.chmod(tmp, 0o755)  # an exported model is meant to be shared
        if os.path.exists(out_dir):
            with temporary_directory(parent, _OLD_PREFIX) as old:
                os.rename(out_dir, os.path.join(old, "model"))  # a link at out_dir is moved, not followed
                os.rename(tmp, out_dir)
        else:
            os.rename(tmp, out_dir)
        release_temporary(out_dir)
    return out_dir


def check_class_names(model):
    """Refuse class names that would shift ids in a one-name-per-line file (they are refused when data is read)."""
    for name in list(model.class_names)[1:]:  # the background (0) is ours
        problem = class_name_problem(name)
        if problem:
            raise ConfigError(f"class name {problem}: it cannot be written one name per line")


def write_config(cfg, folder):
    """The resolved config as ``folder/config.yaml``, readable by all (an export is meant to be shared;
    ``save_config`` writes through a private temporary file)."""
    path = os.path.join(folder, CONFIG_FILE)
    save_config(cfg, path)
    os.chmod(path, 0o644)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.chmod(path, 0o644)


# ----------------------------------------------------------------------------------------------------- ONNX


def export_onnx(model, out_dir, cfg=None, input_size=None, opset=None, check=True):
    """Write ``model`` (a built, loaded :class:`frcnn.model.FasterRCNN` in float32) as ``out_dir/model.onnx`` with
    ``model.json`` and ``config.yaml`` (when ``cfg`` is given) beside it, on the current Keras backend.

    ``input_size`` (height, width): the fixed input size on PyTorch (default :func:`padded_canvas`); TensorFlow's
    file takes any size, and refuses ``input_size``. ``check``: run the file with onnxruntime, when installed, and
    compare its detections with the model's (:class:`ExportError` when they differ; the folder is not written).
    Returns ``(path of the folder, check report or None)``; the report has the largest differences found and the
    detections compared, or ``{"skipped": reason}``.
    """
    import keras

    backend = keras.backend.backend()
    check_format("onnx", backend)
    check_class_names(model)
    if keras.backend.standardize_dtype(model.compute_dtype) != "float32":
        raise ExportError(f"ONNX export needs a float32 model; this one computes in {model.compute_dtype} "
                          "(--set train.mixed_precision=off)")
    if backend == "tensorflow":
        if input_size is not None:
            raise ConfigError("--input-size is for PyTorch's ONNX export; TensorFlow's takes any size")
        from frcnn import tf_export as writer
    else:
        input_size = check_input_size(model.transform, input_size)
        from frcnn import torch_export as writer
    report = {}

    def write(tmp):
        path = os.path.join(tmp, ONNX_FILE)
        used_opset = writer.write_onnx(model, path, input_size=input_size, opset=opset)
        meta = onnx_metadata(model, backend, input_size, used_opset)
        _add_onnx_metadata(path, meta)
        _write_json(os.path.join(tmp, META_FILE), meta)
        if cfg is not None:
            write_config(cfg, tmp)
        if check:
            report.update(check_onnx(path, model, input_size))

    out_dir = write_export_folder(out_dir, write)
    return out_dir, (report or None)


def _add_onnx_metadata(path, meta):
    """Put ``meta`` (JSON) into the ONNX file's ``metadata_props`` under :data:`METADATA_KEY`."""
    import onnx

    proto = onnx.load(path)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, ensure_ascii=False)
    onnx.save(proto, path)
    os.chmod(path, 0o644)


def check_batch(transform, input_size=None, seed=0):
    """A synthetic batch for the export check: two noise images of different sizes and aspect ratios through
    ``transform.prepare_batch`` (then :func:`pad_batch` to ``input_size`` when given)."""
    rng = np.random.default_rng(seed)
    side = transform.max_size
    shapes = [(max(8, side * 3 // 4), side), (side, max(8, side * 2 // 3))]
    batch = transform.prepare_batch([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes])
    return pad_batch(batch, *input_size) if input_size is not None else batch


def check_onnx(path, model, input_size=None):
    """Run ``path`` with onnxruntime on :func:`check_batch` and compare with ``model.predict_on_batch``; returns the
    report of :func:`compare_detections` (``{"skipped": why}`` without onnxruntime), raises :class:`ExportError`
    when they differ."""
    if importlib.util.find_spec("onnxruntime") is None:
        return {"skipped": "onnxruntime is not installed"}
    import onnxruntime

    batch = check_batch(model.transform, input_size)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {n: batch[n] for n in names})))
    expected = model.predict_on_batch({key: batch[key] for key in ONNX_INPUTS})
    try:
        return compare_detections(expected, got)
    except AssertionError as err:
        raise ExportError(f"the exported ONNX file does not give the model's detections ({err})") from None


def compare_detections(expected, got, box_atol=0.05, score_atol=1e-4):
    """Compare padded detections (``boxes``, ``scores``, ``classes``, ``num_detections``) image by image; raises
    ``AssertionError`` naming the first difference, else returns ``{"detections", "ties", "max_box_diff",
    "max_score_diff"}``.

    Per image: the same number of detections, the same scores in decreasing order (within ``score_atol``), and each
    expected detection matched with an unused one of the same class whose box is within ``box_atol`` pixels. Float
    round-off may flip a near-tie (two candidates whose scores are within ``score_atol``): which of them NMS keeps,
    or which is the last of the ``D`` kept. An expected detection without a box match is taken as such a flip (a
    "tie") when an unused detection of the same class has its score within ``score_atol``, or, for the ones left
    over, when all ``D`` are kept and both sides' leftovers pair up by score within ``score_atol`` at the lowest kept
    score. A "tie" of the same class must overlap (IoU >= 0.3), as the two boxes one NMS step chose between do.
    """
    from frcnn.boxes import pairwise_iou_numpy  # frcnn.boxes imports Keras, which this module does not at import

    count, ties, box_diff, score_diff = 0, 0, 0.0, 0.0
    n_expected = np.asarray(expected["num_detections"]).reshape(-1)
    n_got = np.asarray(got["num_detections"]).reshape(-1)
    if n_expected.tolist() != n_got.tolist():
        raise AssertionError(f"detections per image {n_got.tolist()} instead of {n_expected.tolist()}")
    for i, n in enumerate(n_expected.tolist()):
        boxes_e = np.asarray(expected["boxes"][i, :n], np.float64)
        boxes_g = np.asarray(got["boxes"][i, :n], np.float64)
        scores_e = np.asarray(expected["scores"][i, :n], np.float64)
        scores_g = np.asarray(got["scores"][i, :n], np.float64)
        classes_e = np.asarray(expected["classes"][i, :n])
        classes_g = np.asarray(got["classes"][i, :n])
        if n:
            sorted_diff = float(np.abs(np.sort(scores_e) - np.sort(scores_g)).max())
            if sorted_diff > score_atol:
                raise AssertionError(f"image {i}: scores differ by up to {sorted_diff:.3g} (tolerance {score_atol})")
            score_diff = max(score_diff, sorted_diff)
        unused = np.ones(n, bool)
        leftover = []
        for j in range(n):
            same = np.flatnonzero(unused & (classes_g == classes_e[j]))
            distance = np.abs(boxes_g[same] - boxes_e[j]).max(axis=1) if same.size else np.zeros(0)
            close = same[distance <= box_atol]
            if close.size:
                k = close[int(np.argmin(distance[distance <= box_atol]))]
                box_diff = max(box_diff, float(np.abs(boxes_g[k] - boxes_e[j]).max()))
            else:
                tied = same[(np.abs(scores_g[same] - scores_e[j]) <= score_atol)
                            & (pairwise_iou_numpy(boxes_g[same], boxes_e[j:j + 1])[:, 0] >= 0.3)]  # NMS's pair overlaps
                if not tied.size:
                    leftover.append(j)
                    continue
                k = tied[int(np.argmin(np.abs(scores_g[tied] - scores_e[j])))]
                ties += 1
            unused[k] = False
            count += 1
        if leftover:
            left_e = np.sort(scores_e[leftover])
            left_g = np.sort(scores_g[unused])
            at_cut = max(left_e.max() - scores_e.min(), left_g.max() - scores_g.min())
            full = n == np.shape(expected["scores"])[1]  # all D kept: the last ones may differ by a near-tie
            if not full or np.abs(left_e - left_g).max() > score_atol or at_cut > score_atol:
                j = leftover[0]
                raise AssertionError(f"image {i}: detection {j} (class {int(classes_e[j])}, score "
                                     f"{scores_e[j]:.4g}) has no match within {box_atol} px")
            ties += len(leftover)
            count += len(leftover)
    return {"detections": count, "ties": ties, "max_box_diff": box_diff, "max_score_diff": score_diff}


# ------------------------------------------------------------------------------------------------ dispatch


def export(model, out_dir, cfg=None, fmt=None, input_size=None, opset=None, check=True):
    """Export ``model`` as ``fmt`` (default :func:`default_format` of the backend) into the folder ``out_dir``.
    Returns ``(path, check report or None)``; see :func:`export_onnx` and
    :func:`frcnn.tf_export.export_saved_model`."""
    import keras

    backend = keras.backend.backend()
    fmt = fmt or default_format(backend)
    check_format(fmt, backend)
    if fmt == "saved_model":
        if input_size is not None or opset is not None:
            raise ConfigError("--input-size and --opset are for --format onnx")
        from frcnn.tf_export import export_saved_model

        return export_saved_model(model, out_dir, cfg), None
    return export_onnx(model, out_dir, cfg, input_size=input_size, opset=opset, check=check)
