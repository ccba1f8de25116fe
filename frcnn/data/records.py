"""The common record format every reader produces, the report of bad data, and :func:`summary`.

A dataset is a :class:`RecordList` (a plain ``list`` of :class:`Record` with a few attributes about where it came
from). Boxes in a record are in ORIGINAL image pixels, ``(x1, y1, x2, y2)`` continuous coordinates as defined in
:mod:`frcnn.boxes`; classes are ``1..C-1`` indices into ``class_names`` shifted by one, because class 0 is the
background (``frcnn.targets.BACKGROUND``).

Bad data is never silently dropped: every reader reports each problem to a :class:`Report` (file, problem, what was
done). In strict mode (``data.strict``) the first problem raises :class:`DataError` instead.
"""

import collections
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

logger = logging.getLogger("frcnn.data")

# Log at most this many messages of one kind; the rest are counted in the report and in summary().
_LOG_LIMIT_PER_KIND = 10


def io_workers():
    """Threads for reading many small files (annotations, image headers): I/O-bound, so more than the cores."""
    return min(32, 4 * (os.cpu_count() or 1))


def decode_workers(requested=-1):
    """Threads for decoding images (CPU-bound; OpenCV and Pillow release the GIL while they decode): ``requested``
    when positive (``data.num_parallel_calls``), else one per core, at most 16."""
    return int(requested) if requested and requested > 0 else min(16, os.cpu_count() or 1)


class DataError(ValueError):
    """Data that cannot be used (strict mode, or a fatal problem such as a missing root); names the path."""


@dataclass(eq=False)  # numpy fields: compare records by identity
class Record:
    """One image and its annotations.

    Fields:
      image_id: index of this record in its record list (what the pipeline's ``"image_ids"`` refer to).
      file_name: absolute path of the image file.
      width, height: size of the image as decoded (EXIF orientation applied), checked against the file header.
      boxes: ``(K, 4)`` float32, ``(x1, y1, x2, y2)`` in original image pixels (frcnn.boxes convention).
      classes: ``(K,)`` int32 in ``1..C-1`` (0 is background and never appears here).
      difficult: ``(K,)`` bool, Pascal VOC ``difficult`` flag (always False for COCO).
      ignore: ``(K,)`` bool, boxes that are not trained on and are ignored by evaluation: VOC difficult boxes and
        COCO crowd boxes. Training keeps difficult boxes only with ``data.use_difficult``; crowd boxes never.
      source_id: the dataset's own id of the image (VOC file stem, COCO image id): used to write results files.
      orientation: EXIF orientation of the stored file (1 = none); the pipeline applies it when decoding.
      valid_rows: a JPEG cut short: the rows of the stored image that arrived (the pipeline decodes what is there
        and fills the rest with gray); 0 for a complete file.
    """

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    classes: np.ndarray
    difficult: np.ndarray
    ignore: np.ndarray
    source_id: object = None
    orientation: int = 1
    valid_rows: int = 0

    @property
    def num_boxes(self):
        return int(self.boxes.shape[0])

    def train_mask(self, use_difficult=False):
        """``(K,)`` bool: the boxes that become training targets."""
        return ~self.ignore | (self.difficult & bool(use_difficult))


class RecordList(list):
    """A list of :class:`Record` plus where it came from.

    Attributes: ``class_names`` (tuple, without background), ``format`` (voc | coco | shapes), ``split``,
    ``category_ids`` (COCO only: the original category id of class ``i`` is ``category_ids[i - 1]``, needed to
    write COCO results JSON; None otherwise), ``annotation_file`` (COCO only: the instances JSON path).
    Slicing gives a plain list; the records keep their ``image_id``.
    """

    def __init__(self, records=(), class_names=(), format=None, split=None, category_ids=None,
                 annotation_file=None):
        super().__init__(records)
        self.class_names = tuple(class_names)
        self.format = format
        self.split = split
        self.category_ids = None if category_ids is None else tuple(category_ids)
        self.annotation_file = annotation_file


def make_record(image_id, file_name, width, height, boxes=(), classes=(), difficult=None, ignore=None,
                source_id=None, orientation=1, valid_rows=0):
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    k = boxes.shape[0]
    classes = np.asarray(classes, dtype=np.int32).reshape(k)
    difficult = np.zeros(k, bool) if difficult is None else np.asarray(difficult, dtype=bool).reshape(k)
    ignore = difficult.copy() if ignore is None else np.asarray(ignore, dtype=bool).reshape(k)
    return Record(int(image_id), str(file_name), int(width), int(height), boxes, classes, difficult, ignore,
                  source_id, int(orientation), int(valid_rows))


@dataclass(frozen=True)
class Issue:
    """One problem found in the data: ``path`` (file), ``problem`` (what is wrong), ``action`` (what was done)."""

    path: str
    problem: str
    action: str

    @property
    def kind(self):
        # Group messages by their wording up to the first detail in parentheses or after a colon.
        return self.problem.split(" (")[0].split(":")[0]

    def __str__(self):
        return f"{self.path}: {self.problem} -> {self.action}"


@dataclass
class Report:
    """Problems found while reading a dataset.

    ``skipped``: images left out entirely (missing, unreadable, unparsable annotation); ``warnings``: images kept
    with a fix (box dropped or clipped, size corrected). Each is a list of :class:`Issue`. With ``strict`` the first
    problem raises :class:`DataError` naming the file.
    """

    strict: bool = False
    log: bool = True  # log each problem (the first few of each kind) as it is found
    skipped: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    _logged: collections.Counter = field(default_factory=collections.Counter, repr=False)

    def _add(self, issue, target):
        if self.strict:
            raise DataError(f"{issue.path}: {issue.problem} (data.strict is on; without it: {issue.action})")
        target.append(issue)
        if not self.log:
            return
        kind = issue.kind
        self._logged[kind] += 1
        if self._logged[kind] <= _LOG_LIMIT_PER_KIND:
            logger.warning("%s", issue)
        elif self._logged[kind] == _LOG_LIMIT_PER_KIND + 1:
            logger.warning("further '%s' problems are not logged one by one (see frcnn.data.summary)", kind)

    def skip(self, path, problem, action="image skipped"):
        self._add(Issue(str(path), problem, action), self.skipped)

    def warn(self, path, problem, action):
        self._add(Issue(str(path), problem, action), self.warnings)

    def add(self, issues):
        """Add issues collected elsewhere (e.g. in worker threads), in order: ``(is_skip, Issue)`` pairs."""
        for is_skip, issue in issues:
            self._add(issue, self.skipped if is_skip else self.warnings)

    @property
    def skipped_files(self):
        return [issue.path for issue in self.skipped]

    def __bool__(self):
        return bool(self.skipped or self.warnings)


class IssueCollector:
    """Collects issues for one image in a worker thread; the main thread hands them to the :class:`Report` in order
    (so reports are deterministic and strict mode raises for the first bad file of the list)."""

    def __init__(self):
        self.issues = []

    def skip(self, path, problem, action="image skipped"):
        self.issues.append((True, Issue(str(path), problem, action)))

    def warn(self, path, problem, action):
        self.issues.append((False, Issue(str(path), problem, action)))


def check_boxes(boxes, width, height, path, issues, labels=None):
    """Validate ``(K, 4)`` boxes against an image of ``width x height``: clip boxes that stick out, drop boxes that
    are empty (before or after clipping) or not finite. Returns ``(boxes, keep)`` with ``keep`` the ``(K,)`` mask
    of kept boxes; every change is reported to ``issues``. ``labels`` (optional) names each box in messages."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    finite = np.all(np.isfinite(boxes), axis=1)
    safe = np.where(finite[:, None], boxes, 0.0)
    empty = finite & ((safe[:, 2] <= safe[:, 0]) | (safe[:, 3] <= safe[:, 1]))
    limits = np.array([width, height, width, height], np.float32)
    clipped = np.clip(safe, 0.0, limits)
    changed = finite & ~empty & np.any(clipped != safe, axis=1)
    outside = changed & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    keep = finite & ~empty & ~outside
    if np.all(keep) and not np.any(changed):  # the common case: nothing to say
        return boxes, keep
    for i in np.flatnonzero(~keep | changed):  # messages only for the few problem boxes
        what = f"box {i}" + (f" ({labels[i]})" if labels is not None else "") + f" {_fmt_box(boxes[i])}"
        if not finite[i]:
            issues.warn(path, f"non-finite coordinates: {what}", "box dropped")
        elif empty[i] and (boxes[i, 2] < boxes[i, 0] or boxes[i, 3] < boxes[i, 1]):
            issues.warn(path, f"inverted box (x1 > x2 or y1 > y2): {what}", "box dropped")
        elif empty[i]:
            issues.warn(path, f"zero-area box: {what}", "box dropped")
        elif outside[i]:
            issues.warn(path, f"box outside the image ({width}x{height}): {what}", "box dropped")
        else:
            issues.warn(path, f"box outside the image ({width}x{height}): {what}",
                        f"box clipped to {_fmt_box(clipped[i])}")
    return np.where(keep[:, None], clipped, boxes).astype(np.float32), keep


def _fmt_box(box):
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def summary(records, class_names, report=None):
    """A human-readable account of a dataset: images, boxes per class, skipped files and why, warnings by kind."""
    class_names = tuple(class_names)
    n = len(records)
    counts = np.zeros(len(class_names) + 1, dtype=np.int64)
    ignored = np.zeros(len(class_names) + 1, dtype=np.int64)
    empty = 0
    for r in records:
        if r.num_boxes == 0:
            empty += 1
        np.add.at(counts, r.classes, 1)
        np.add.at(ignored, r.classes[r.ignore], 1)
    total = int(counts.sum())
    lines = [f"{n} images ({empty} without objects), {total} boxes ({int(ignored.sum())} difficult/crowd, "
             f"not trained on by default), {len(class_names)} classes"]
    width = max([len(c) for c in class_names] + [5])
    for i, name in enumerate(class_names, start=1):
        extra = f"  ({ignored[i]} difficult/crowd)" if ignored[i] else ""
        lines.append(f"  {name:<{width}} {counts[i]:>8}{extra}")
    if report is not None:
        lines.append(f"skipped files: {len(report.skipped)}")
        for issue in report.skipped[:20]:
            lines.append(f"  {issue.path}: {issue.problem}")
        if len(report.skipped) > 20:
            lines.append(f"  ... and {len(report.skipped) - 20} more")
        lines.append(f"warnings: {len(report.warnings)}")
        by_kind = collections.OrderedDict()
        for issue in report.warnings:
            by_kind.setdefault(issue.kind, []).append(issue)
        for kind, issues in by_kind.items():
            lines.append(f"  {kind}: {len(issues)} (e.g. {issues[0]})")
    return "\n".join(lines)


def class_index(class_names):
    """``{name: class id}`` with ids starting at 1 (0 is background)."""
    return {name: i for i, name in enumerate(class_names, start=1)}


def optional_int(value) -> Optional[int]:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def missing_targets(records, use_difficult, purpose):
    """What is wrong when ``records`` hold no box to ``purpose`` (crowd and difficult boxes do not count unless
    ``use_difficult``), else None. Without it a run trains on background alone, exits 0 and prints AP -1."""
    usable = sum(int(np.sum(r.train_mask(use_difficult))) for r in records)
    if usable:
        return None
    ignored = sum(int(np.sum(r.ignore)) for r in records)
    if ignored:
        return (f"has {len(records)} images but no box to {purpose}: all {ignored} boxes are crowd (COCO iscrowd) "
                "or difficult (VOC) regions, which are only ignored" + (
                    "; set data.use_difficult=true to train on difficult boxes" if purpose == "train on" else ""))
    return f"has {len(records)} images but no object boxes at all (check the annotations and data.classes)"
