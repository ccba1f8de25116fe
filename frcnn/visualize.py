"""Drawing detections on images with OpenCV (RGB uint8 arrays in, RGB uint8 arrays out)."""

import os

import cv2
import numpy as np

from frcnn.fileio import atomic_write_bytes


def _colour(class_id):
    # A fixed, well-spread colour per class id (golden-ratio hue steps), as RGB.
    hue = int((class_id * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def draw_detections(image, boxes, scores, classes, class_names, score_thresh=0.0):
    """A copy of ``image`` (HxWx3 uint8 RGB) with each box, its class name and score drawn.

    ``boxes`` (N, 4) ``(x1, y1, x2, y2)`` in the image's pixels, ``scores`` (N,), ``classes`` (N,) class ids indexing
    ``class_names`` (which includes the background at 0), or class-name strings.
    """
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    h, w = out.shape[:2]
    thickness = max(1, int(round(min(h, w) / 300)))
    font_scale = max(0.4, min(h, w) / 800)
    for box, score, cls in zip(np.asarray(boxes), np.asarray(scores), classes):
        if score < score_thresh:
            continue
        if isinstance(cls, str):
            name, cid = cls, (class_names.index(cls) if cls in class_names else 0)
        else:
            cid = int(cls)
            name = class_names[cid] if 0 <= cid < len(class_names) else str(cid)
        colour = _colour(cid)
        x1, y1, x2, y2 = [int(round(v)) for v in box]
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        label = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = max(y1, th + base)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty), colour, -1)
        cv2.putText(out, label, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def draw_confident(image, detection, class_names, min_score=0.5):
    """``image`` with the detections of ``detection`` (a dict of ``boxes``, ``scores``, ``classes``) scoring at
    least ``min_score`` drawn; when none does, the best one, so that an early model still shows something."""
    scores = np.asarray(detection["scores"])
    keep = scores >= min_score
    if not keep.any() and len(scores):
        keep[np.argmax(scores)] = True
    return draw_detections(image, np.asarray(detection["boxes"])[keep], scores[keep],
                           np.asarray(detection["classes"])[keep], class_names)


def save_image(path, image):
    """Write an RGB uint8 image (JPEG or PNG by extension); raises OSError naming the path on failure.

    Encoded in memory and written atomically (:func:`frcnn.fileio.atomic_write_bytes`): a symbolic link already at
    ``path`` is replaced, never written through, and a reader never sees half an image."""
    ext = os.path.splitext(os.fspath(path))[1].lower() or ".png"
    try:
        ok, data = cv2.imencode(ext, cv2.cvtColor(np.asarray(image, np.uint8), cv2.COLOR_RGB2BGR))
    except cv2.error:
        ok = False
    if not ok:
        raise OSError(f"could not encode image '{path}' (extension {ext})")
    atomic_write_bytes(path, data.tobytes())
    return path
