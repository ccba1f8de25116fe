"""``shapes``: the embedded synthetic dataset (no download), written once to disk in the Pascal VOC layout.

Each image is a textured, noisy background (a low-saturation colour, a gradient, low-frequency ripples, pixel noise)
with ``0..max_objects`` filled shapes of three classes, :data:`SHAPE_CLASSES`, in saturated colours that say
nothing about the class. Objects measure ``data.synthetic.object_size``
pixels (default about ``24..112`` px at ``image_size = 256``, scaled with the image size), which suits anchors of
``32..128`` px. Objects may overlap a little, but every object keeps at least 60% of its area
visible and no two boxes overlap with IoU above 0.3. Boxes are the exact extent of each object's VISIBLE pixels.
One image in 25 has no object at all (background-only images are valid training data).

Everything is a function of :class:`frcnn.config.SyntheticConfig` (seed, sizes, counts) and the split names: each
image has its own random generator seeded by ``(seed, split, index)``, so the files are identical on every machine.
Generation writes into a temporary directory beside ``data.root`` and renames it into place, so an interrupted run
never leaves a half dataset (and the next run removes the temporary folder a killed one left); a ``shapes.json``
manifest records the parameters and is checked before re-use.
"""

import dataclasses
import json
import os

import numpy as np

from frcnn.data.records import DataError, logger
from frcnn.fileio import release_temporary, remove_orphaned_directories, temporary_directory

SHAPE_CLASSES = ("circle", "square", "triangle")
MANIFEST = "shapes.json"
_VERSION = 1
_TMP_PREFIX = ".shapes-tmp-"  # beside data.root while generating
_OLD_PREFIX = ".shapes-old-"  # beside data.root while replacing a stale dataset
_EMPTY_EVERY = 25  # image i of a split has no object when i % 25 == 12 (4% of images)
_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (250, 250, 250), (20, 20, 20),
], dtype=np.float32)  # RGB


def _params(cfg):
    s = cfg.data.synthetic
    return {
        "version": _VERSION,
        "image_size": s.image_size,
        "num_train": s.num_train,
        "num_val": s.num_val if cfg.data.val_split else 0,
        "max_objects": s.max_objects,
        "object_size": list(_object_size(s.object_size, s.image_size)),
        "seed": s.seed,
        "train_split": cfg.data.train_split,
        "val_split": cfg.data.val_split,
        "classes": list(SHAPE_CLASSES),
    }


def _object_size(object_size, image_size):
    """(min, max) object extent in pixels: the configured range, or 24..112 px scaled by ``image_size / 256``."""
    if object_size is None:
        return 24.0 * image_size / 256.0, 112.0 * image_size / 256.0
    return float(object_size[0]), float(object_size[1])


def _background(rng, size):
    # Separable terms (outer products) instead of full-size trigonometry: far cheaper per image.
    t = np.arange(size, dtype=np.float32) / size - 0.5
    grey = rng.uniform(70, 190)
    tint = rng.uniform(-25, 25, size=3).astype(np.float32)
    gx, gy = rng.uniform(-40, 40, size=2)
    field = (gy * t)[:, None] + (gx * t)[None, :]
    for _ in range(3):  # low-frequency ripples sin(2 pi (fx x + fy y) + phase): texture to learn to ignore
        fx, fy = rng.uniform(1, 8, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(4, 14)
        ax, ay = 2 * np.pi * fx * t, 2 * np.pi * fy * t + phase
        field += amp * (np.sin(ay)[:, None] * np.cos(ax)[None, :] + np.cos(ay)[:, None] * np.sin(ax)[None, :])
    base = field[:, :, None] + (grey + tint)[None, None, :]
    base += rng.standard_normal(size=base.shape, dtype=np.float32) * 10.0
    return base


def _shape_mask(rng, cls, size, cx, cy, extent):
    import cv2

    mask = np.zeros((size, size), np.uint8)
    r = extent / 2.0
    if cls == 0:  # circle
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(r)), 1, -1)
        return mask
    angle = rng.uniform(0, 2 * np.pi)
    if cls == 1:  # square: corners at radius r / sqrt(2) * sqrt(2) = r; rotated by a random angle
        angles = angle + np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
        radius = r
    else:  # triangle: roughly equilateral, random rotation
        angles = angle + np.array([0.0, 2.0 / 3.0, 4.0 / 3.0]) * np.pi + rng.uniform(-0.15, 0.15, 3)
        radius = r
    pts = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def _iou(a, b):
    # Not frcnn.boxes.pairwise_iou_numpy: frcnn.boxes imports Keras, and the data side must not (the NumPy
    # pipeline and the dataset generators run without it).
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _bbox(mask):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def render_image(rng, size, max_objects, empty, object_size=None):
    """One synthetic image: ``(uint8 RGB image, [(class index 0..2, (x1, y1, x2, y2))])``; objects measure
    ``object_size = (min, max)`` pixels (log-uniform; default 24..112 scaled by ``size / 256``)."""
    image = _background(rng, size)
    labels = np.zeros((size, size), np.int32)  # 0 = background, k = object k (1-based); later objects on top
    full_areas = []
    objects = []  # (cls, colour)
    n = 0 if empty else int(rng.integers(1, max_objects + 1))
    lo, hi = _object_size(object_size, size)
    for _ in range(n):
        for _attempt in range(30):
            cls = int(rng.integers(len(SHAPE_CLASSES)))
            extent = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            margin = extent / 2.0 + 1
            cx, cy = rng.uniform(margin, size - margin, size=2)
            mask = _shape_mask(rng, cls, size, cx, cy, extent).astype(bool)
            if mask.sum() < 16:
                continue
            box = _bbox(mask)
            ok = True
            for k in range(1, len(objects) + 1):
                visible = np.count_nonzero((labels == k) & ~mask)
                if visible < 0.6 * full_areas[k - 1] or _iou(_bbox(labels == k), box) > 0.3:
                    ok = False
                    break
            if ok:
                break
        else:
            continue  # no room left for another object
        colour = _PALETTE[int(rng.integers(len(_PALETTE)))] + rng.uniform(-20, 20, size=3)
        objects.append((cls, colour))
        full_areas.append(int(mask.sum()))
        labels[mask] = len(objects)
    for k, (_, colour) in enumerate(objects, start=1):
        region = labels == k
        shade = rng.uniform(0.85, 1.1)
        image[region] = colour * shade + rng.normal(0, 6, size=(int(region.sum()), 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    annotations = [(cls, _bbox(labels == k)) for k, (cls, _) in enumerate(objects, start=1)]
    return image, annotations


def _xml(file_name, size, annotations):
    lines = ["<annotation>", "\t<folder>JPEGImages</folder>", f"\t<filename>{file_name}</filename>",
             "\t<source><database>frcnn shapes (synthetic)</database></source>",
             f"\t<size><width>{size}</width><height>{size}</height><depth>3</depth></size>",
             "\t<segmented>0</segmented>"]
    for cls, (x1, y1, x2, y2) in annotations:
        # Continuous (x1, y1, x2, y2) -> VOC 1-based inclusive (x1 + 1, y1 + 1, x2, y2).
        lines += ["\t<object>", f"\t\t<name>{SHAPE_CLASSES[cls]}</name>", "\t\t<pose>Unspecified</pose>",
                  "\t\t<truncated>0</truncated>", "\t\t<difficult>0</difficult>",
                  f"\t\t<bndbox><xmin>{int(x1) + 1}</xmin><ymin>{int(y1) + 1}</ymin><xmax>{int(x2)}</xmax>"
                  f"<ymax>{int(y2)}</ymax></bndbox>", "\t</object>"]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _splits(params):
    out = [(params["train_split"], 0, params["num_train"])]
    # A validation split named like the training split (evaluating on the training images) is that same split.
    if params["val_split"] and params["val_split"] != params["train_split"]:
        out.append((params["val_split"], 1, params["num_val"]))
    return out


def _write(directory, params):
    import cv2

    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    size = params["image_size"]
    for split, split_code, count in _splits(params):
        ids = []
        for i in range(count):
            rng = np.random.default_rng([params["seed"], split_code, i])
            image, annotations = render_image(rng, size, params["max_objects"], i % _EMPTY_EVERY == 12,
                                              params["object_size"])
            image_id = f"{split}_{i:05d}"
            ok, data = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise DataError(f"could not encode synthetic image {image_id}")
            with open(os.path.join(directory, "JPEGImages", image_id + ".jpg"), "wb") as f:
                f.write(data.tobytes())
            with open(os.path.join(directory, "Annotations", image_id + ".xml"), "w", encoding="utf-8") as f:
                f.write(_xml(image_id + ".jpg", size, annotations))
            ids.append(image_id)
        with open(os.path.join(directory, "ImageSets", "Main", split + ".txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(ids) + "\n")
    # The manifest is written last: its presence (with matching parameters) is what marks a complete dataset.
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"generator": "frcnn.data.shapes", "params": params}, f, indent=1)


def _is_complete(root, params):
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params:
        return False
    for split, _, count in _splits(params):
        for i in range(count):
            image_id = f"{split}_{i:05d}"
            if not (os.path.isfile(os.path.join(root, "JPEGImages", image_id + ".jpg"))
                    and os.path.isfile(os.path.join(root, "Annotations", image_id + ".xml"))):
                return False
        if not os.path.isfile(os.path.join(root, "ImageSets", "Main", split + ".txt")):
            return False
    return True


def ensure_shapes(cfg):
    """Generate the shapes dataset under ``data.root`` unless a complete one with the same parameters is there.

    Returns the absolute root. A root that exists but holds something else (no ``shapes.json``) is never touched:
    that is a :class:`DataError` naming it.
    """
    if not isinstance(cfg.data.root, str):
        raise DataError(f"data.format shapes takes one data.root, got {list(cfg.data.root)}")
    root = os.path.abspath(cfg.data.root)
    params = _params(cfg)
    if _is_complete(root, params):
        return root
    if os.path.exists(root):
        ours = os.path.isfile(os.path.join(root, MANIFEST))
        if not ours and (not os.path.isdir(root) or os.listdir(root)):
            raise DataError(f"data.root {root} exists but is not a generated shapes dataset (no {MANIFEST}): "
                            "remove it or point data.root elsewhere")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    # The temporary folders of a generation that was killed (their owner's lock is gone): 20+ MB each otherwise.
    for orphan in remove_orphaned_directories(parent, _TMP_PREFIX) + remove_orphaned_directories(parent, _OLD_PREFIX):
        logger.info("removed %s, left by an interrupted shapes generation", orphan)
    logger.info("generating the shapes dataset in %s (%d train, %d val images of %d px)", root,
                params["num_train"], params["num_val"], params["image_size"])
    # An owned temporary folder, with the permissions of an ordinary new folder (not mkdtemp's private 0700).
    with temporary_directory(parent, _TMP_PREFIX) as tmp, temporary_directory(parent, _OLD_PREFIX) as old:
        _write(tmp, params)
        if os.path.exists(root):  # a stale or incomplete generated dataset, or an empty directory
            os.rename(root, os.path.join(old, "data"))
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root, params):  # another process did not just finish the same work
                raise
        else:
            release_temporary(root)
    return root


def shapes_config(cfg):
    """``cfg`` with ``data.classes`` set to the shapes classes (when not given)."""
    if cfg.data.classes is not None:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, classes=SHAPE_CLASSES))
