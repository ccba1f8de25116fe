"""Where Detectron2 weights come from: the model-zoo registry, ``detectron2:<name>`` specs, the download with its
SHA-256 record, the class lists of the zoo's datasets and the frcnn config that fits each checkpoint.

Sources (Detectron2 commit 02b5c4e): zoo URLs and ids from ``detectron2/model_zoo/model_zoo.py`` and MODEL_ZOO.md;
COCO's class order from ``data/datasets/builtin_meta.py``, VOC's from ``data/datasets/pascal_voc.py``.

Specs (``--weights`` of the tools, ``model.backbone_weights``): ``detectron2:<zoo name>`` (see :data:`ZOO`), downloaded
once with ``keras.utils.get_file`` into ``~/.keras/detectron2`` (``KERAS_HOME``); Detectron2 publishes no checksums,
so the SHA-256 of the file is recorded beside it (``<file>.sha256``) when it first arrives and checked on every later
load. A path to a local ``.pkl`` works the same way offline.

Owns: names, files and downloads. Imports no model code and no backend.
"""

import dataclasses
import hashlib
import logging
import os
import re

from frcnn.errors import TrainingError

log = logging.getLogger(__name__)

PREFIX = "detectron2:"
DOWNLOAD_ROOT = "https://dl.fbaipublicfiles.com/detectron2/"
CACHE_SUBDIR = "detectron2"
D2_NORM_EPSILON = 1e-5  # FrozenBatchNorm2d's eps
D2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)  # detectron2/config/defaults.py, MODEL.PIXEL_MEAN (BGR)
D2_PIXEL_STD_BGR = (1.0, 1.0, 1.0)

# Detectron2's COCO class order (builtin_meta.COCO_CATEGORIES with isthing=1, i.e. increasing category id) and the
# COCO category id of each; cls_score row i (i < 80) is COCO_CLASSES[i].
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
# detectron2/data/datasets/pascal_voc.py CLASS_NAMES
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


class PretrainedError(TrainingError):
    """A Detectron2 file that cannot be used (missing, swapped, another architecture); the message says why."""


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str  # Detectron2's config path without .yaml, e.g. COCO-Detection/faster_rcnn_R_50_C4_3x
    url: str
    config: str  # the frcnn config reproducing its test-time settings (and training recipe)
    published: str  # the figure MODEL_ZOO.md gives
    backbone_only: bool = False

    @property
    def filename(self):
        """Name of the cached file: the model id and Detectron2's file name (unique across the zoo)."""
        return "_".join(self.url.split("/")[-2:])  # 137849393_model_final_f97cb7.pkl, MSRA_R-50.pkl


def _zoo_url(name, suffix):
    return f"{DOWNLOAD_ROOT}{name}/{suffix}"


# detectron2/model_zoo/model_zoo.py (_ModelZooUrls) and MODEL_ZOO.md
ZOO = {
    entry.name: entry
    for entry in (
        ZooEntry("COCO-Detection/faster_rcnn_R_50_C4_1x", _zoo_url("COCO-Detection/faster_rcnn_R_50_C4_1x",
                 "137257644/model_final_721ade.pkl"), "detectron2_coco_R50_C4_1x.yaml", "COCO val2017 box AP 35.7"),
        ZooEntry("COCO-Detection/faster_rcnn_R_50_C4_3x", _zoo_url("COCO-Detection/faster_rcnn_R_50_C4_3x",
                 "137849393/model_final_f97cb7.pkl"), "detectron2_coco_R50_C4_3x.yaml", "COCO val2017 box AP 38.4"),
        ZooEntry("PascalVOC-Detection/faster_rcnn_R_50_C4", _zoo_url("PascalVOC-Detection/faster_rcnn_R_50_C4",
                 "142202221/model_final_b1acc2.pkl"), "detectron2_voc_R50_C4.yaml",
                 "VOC2007 test AP50 80.3 (11-point)"),
        ZooEntry("ImageNetPretrained/MSRA/R-50", DOWNLOAD_ROOT + "ImageNetPretrained/MSRA/R-50.pkl", None,
                 "ImageNet (MSRA ResNet-50)", backbone_only=True),
    )
}


# keras-hub-style preset names (``FasterRCNN.from_preset``) of the zoo's detectors.
PRESETS = {
    "detectron2_coco_r50_c4_1x": "COCO-Detection/faster_rcnn_R_50_C4_1x",
    "detectron2_coco_r50_c4_3x": "COCO-Detection/faster_rcnn_R_50_C4_3x",
    "detectron2_voc_r50_c4": "PascalVOC-Detection/faster_rcnn_R_50_C4",
}


def preset_entry(name):
    """The :class:`ZooEntry` of a preset name (:data:`PRESETS`), or None when ``name`` is not one."""
    key = PRESETS.get(str(name).lower())
    return ZOO[key] if key else None


# --------------------------------------------------------------------------------------------- specs and files


def is_detectron2_spec(weights):
    """True for ``detectron2:<name>`` and for paths of ``.pkl`` files (handled here, not by Keras)."""
    return isinstance(weights, (str, os.PathLike)) and (
        os.fspath(weights).startswith(PREFIX) or os.fspath(weights).endswith(".pkl"))


def zoo_entry(spec):
    """The :class:`ZooEntry` of ``detectron2:<name>`` (``<name>`` with or without ``.yaml``/``.pkl``)."""
    name = os.fspath(spec)
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    name = re.sub(r"\.(yaml|pkl)$", "", name.strip().strip("/"))
    if name not in ZOO:
        raise PretrainedError(f"unknown Detectron2 model '{spec}'; this detector (ResNet-50-C4) can load: "
                              + ", ".join(PREFIX + n for n in ZOO))
    return ZOO[name]


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _md5_prefix_note(path):
    """MODEL_ZOO.md says a zoo file name carries its md5 prefix (``model_final_721ade.pkl``): say whether it does."""
    match = re.search(r"_([0-9a-f]{6})\.pkl$", os.path.basename(path))
    if not match:
        return
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
    if md5.hexdigest().startswith(match.group(1)):
        log.info("%s: its md5 starts with %s, as its name says", path, match.group(1))
    else:
        log.warning("%s: its md5 is %s, which does not start with the %s in its name (Detectron2's MODEL_ZOO.md "
                    "says zoo file names carry their md5 prefix); if loading fails, delete it to download again",
                    path, md5.hexdigest(), match.group(1))


def check_sidecar(path, fresh):
    """Record (first arrival) or check the SHA-256 of a cached file in ``<path>.sha256``. Returns the digest.

    ``fresh``: the file was just downloaded. A cached file without a record is recorded too, with a warning that it
    could not be checked. A file whose digest differs from its record is refused.
    """
    sidecar = path + ".sha256"
    digest = sha256_file(path)
    if os.path.isfile(sidecar):
        with open(sidecar, encoding="ascii", errors="replace") as f:
            text = f.read().split()
        recorded = text[0].lower() if text else ""
        if recorded != digest:
            raise PretrainedError(
                f"cached file '{path}' has SHA-256 {digest}, but {recorded or '(nothing)'} was recorded in "
                f"'{sidecar}' when it was downloaded: the file was modified, truncated or replaced. Delete both "
                "files to download it again."
            )
        return digest
    tmp = sidecar + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(tmp, sidecar)
    if fresh:
        log.info("downloaded %s; recorded its SHA-256 %s in %s", path, digest, sidecar)
        _md5_prefix_note(path)
    else:
        log.warning("%s was already cached without a SHA-256 record (from before this check existed, or copied "
                    "there by hand); recorded %s now, later loads are checked against it", path, digest)
    return digest


def _get_file(fname, origin, cache_dir, cache_subdir):
    import keras

    return keras.utils.get_file(fname, origin=origin, cache_dir=cache_dir, cache_subdir=cache_subdir)


def resolve(spec, cache_dir=None):
    """A local file for ``spec``: a path as given (it must exist), or the cached download of a zoo name.

    ``cache_dir``: where Keras caches (default ``$KERAS_HOME`` or ``~/.keras``); files go to its ``detectron2/``.
    """
    spec = os.fspath(spec)
    if not spec.startswith(PREFIX):
        if not os.path.isfile(spec):
            raise PretrainedError(f"Detectron2 weights file '{spec}' does not exist")
        sidecar = spec + ".sha256"
        if os.path.isfile(sidecar):
            check_sidecar(spec, fresh=False)
        return spec
    entry = zoo_entry(spec)
    base = cache_dir or os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    target = os.path.join(base, CACHE_SUBDIR, entry.filename)
    existed = os.path.isfile(target)
    try:
        path = _get_file(entry.filename, entry.url, base, CACHE_SUBDIR)
    except Exception as err:  # no network, proxy, HTTP error, interrupted download
        raise PretrainedError(
            f"could not download {spec} from {entry.url} ({type(err).__name__}: {err}). Offline, download that "
            f"file elsewhere and either pass its path instead of {spec} or copy it to {target}"
        ) from err
    check_sidecar(path, fresh=not existed)
    return path


# -------------------------------------------------------------------------------------------------- the tools


def default_config(spec, checkpoint=None):
    """The config (a name under ``configs/``) for a detector spec: the zoo entry's, or for a local file the one
    whose zoo file name it carries, else by its number of classes (80: COCO, 20: VOC)."""
    spec = os.fspath(spec)
    if spec.startswith(PREFIX):
        entry = zoo_entry(spec)
        if entry.backbone_only:
            raise PretrainedError(f"{spec} is an ImageNet backbone, not a detector: use it as "
                                  "model.backbone_weights for training")
        return entry.config
    base = os.path.basename(spec)
    for entry in ZOO.values():
        if entry.url.endswith("/" + base) or base == entry.filename:
            if entry.config:
                return entry.config
    if checkpoint is not None:
        cls = checkpoint.tensors.get("roi_heads.box_predictor.cls_score.weight")
        if cls is not None and cls.shape[0] - 1 == len(COCO_CLASSES):
            return ZOO["COCO-Detection/faster_rcnn_R_50_C4_3x"].config
        if cls is not None and cls.shape[0] - 1 == len(VOC_CLASSES):
            return ZOO["PascalVOC-Detection/faster_rcnn_R_50_C4"].config
    raise PretrainedError(f"cannot tell which config fits '{spec}'; pass --config (e.g. "
                          f"{ZOO['COCO-Detection/faster_rcnn_R_50_C4_3x'].config} with data.classes set to the "
                          "checkpoint's classes in its order)")
