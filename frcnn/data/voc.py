"""Pascal VOC reader: ``<root>/{JPEGImages, Annotations, ImageSets/Main/<split>.txt}`` (VOCdevkit/VOC2007 style).

Several roots (VOC07+12: ``data.root`` as a list) are read in order and joined into one record list. A root that
lacks the split file is skipped with a warning as long as another root has it (VOC2012 has no annotated ``test``);
with one root, or none having it, that is a :class:`DataError` naming the path.

Coordinates: VOC's 1-based inclusive ``(xmin, ymin, xmax, ymax)`` becomes ``(xmin - 1, ymin - 1, xmax, ymax)``
(frcnn.boxes); fractional coordinates are accepted as they are. ``difficult`` boxes are kept and flagged.

Each image is checked while indexing (in a thread pool: it is file I/O): the annotation parses, the image exists and
its header is sound (see :mod:`frcnn.data.imageio`), ``<size>`` agrees with the real image (the real image wins),
boxes are inside the image (clipped) and not empty (dropped). Every problem goes to the :class:`Report`.
"""

import concurrent.futures
import os
import xml.etree.ElementTree as ET

import numpy as np

from frcnn.config import class_name_problem, data_roots
from frcnn.data.imageio import TRUNCATED_ACTION, ImageProblem, inspect_image, reconcile_size, truncated_problem
from frcnn.data.records import (DataError, IssueCollector, RecordList, Report, check_boxes, class_index,
                                io_workers, logger, make_record)
from frcnn.fileio import is_within

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".gif", ".webp")
_COORDS = ("xmin", "ymin", "xmax", "ymax")


def check_root(root, key="data.root"):
    if not os.path.isdir(root):
        raise DataError(f"{key} {root} does not exist (or is not a directory)")


def split_file(root, split):
    return os.path.join(root, "ImageSets", "Main", f"{split}.txt")


def read_split_ids(root, split):
    """Image ids listed in ``ImageSets/Main/<split>.txt`` (first token of each non-empty line), in file order."""
    path = split_file(root, split)
    if not os.path.isfile(path):
        raise DataError(f"split file {path} does not exist (split '{split}' of data.root {root})")
    with open(path, encoding="utf-8") as f:
        ids = [_split_line_id(line) for line in f if line.strip()]
    if not ids:
        raise DataError(f"split file {path} lists no image ids (it is empty): split '{split}' of data.root {root} "
                        "has no images. Put one image id (an annotation file name without .xml) on each line.")
    seen = set()
    unique = []
    repeated = []
    for i in ids:  # a duplicated id would make the same image count twice
        if i not in seen:
            seen.add(i)
            unique.append(i)
        elif i not in repeated:
            repeated.append(i)
    if repeated:
        logger.warning("%s lists %d ids more than once (%s%s); each image is used once", path,
                       len(ids) - len(unique), ", ".join(repr(i) for i in repeated[:5]),
                       ", ..." if len(repeated) > 5 else "")
    return unique


def _split_line_id(line):
    """The image id of a split-file line. VOC's per-class files add a flag (``2008_000008  1``); Main/<split>.txt
    lines are just the id, which may itself contain spaces (``my photo``): only a trailing -1/0/1 is a flag."""
    text = line.strip()
    head, _, last = text.rpartition(" ")
    if head and last in ("-1", "0", "1"):
        return head.strip()
    return text


def _split_roots(cfg, split, report):
    """The roots that have ``split``: all of them, or a DataError naming the missing split file."""
    roots = [os.path.abspath(r) for r in data_roots(cfg)]
    for root in roots:
        check_root(root)
    have = [r for r in roots if os.path.isfile(split_file(r, split))]
    if not have or len(roots) == 1:
        missing = [split_file(r, split) for r in roots if r not in have]
        if missing:
            raise DataError(f"split file {missing[0]} does not exist (split '{split}' of data.root {roots[0]})")
    for root in roots:
        if root not in have:
            report.warn(split_file(root, split), f"split '{split}' missing in this root", "root not used for it")
    for root in have:
        for sub in ("Annotations", "JPEGImages"):
            if not os.path.isdir(os.path.join(root, sub)):
                raise DataError(f"{os.path.join(root, sub)} does not exist (data.root {root} is not in VOC layout)")
    return have


def _text(node, tag):
    child = node.find(tag)
    if child is None or child.text is None:
        return None
    return child.text.strip()


def _parse_xml(xml_path, issues):
    """``(filename, xml_size or None, objects)`` with objects ``[(name, [xmin, ymin, xmax, ymax] or None,
    difficult)]``; None when the file is missing or not XML (reported as a skip)."""
    if not os.path.isfile(xml_path):
        issues.skip(xml_path, "annotation file missing")
        return None
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as err:
        issues.skip(xml_path, f"annotation is not valid XML ({err})")
        return None
    except OSError as err:
        issues.skip(xml_path, f"annotation cannot be read ({err.strerror})")
        return None
    root = tree.getroot()
    filename = _text(root, "filename")
    size = None
    size_node = root.find("size")
    if size_node is not None:
        try:
            size = (int(round(float(_text(size_node, "width")))), int(round(float(_text(size_node, "height")))))
        except (TypeError, ValueError):
            size = None
    objects = []
    for index, obj in enumerate(root.iter("object")):
        name = _text(obj, "name")
        if not name:
            issues.warn(xml_path, f"missing <name>: object {index}", "box dropped")
            continue
        problem = class_name_problem(name)
        if problem:  # a newline in a name would shift every later id of a file of names
            issues.warn(xml_path, f"class name with control characters: object {index}, {problem}", "box dropped")
            continue
        difficult_text = _text(obj, "difficult")
        try:
            difficult = bool(int(float(difficult_text))) if difficult_text else False
        except ValueError:
            issues.warn(xml_path, f"non-numeric <difficult>: object {index} ({name}) {difficult_text!r}",
                        "treated as 0")
            difficult = False
        bndbox = obj.find("bndbox")
        if bndbox is None:
            issues.warn(xml_path, f"missing <bndbox>: object {index} ({name})", "box dropped")
            objects.append((name, None, difficult))
            continue
        coords = []
        for key in _COORDS:
            value = _text(bndbox, key)
            if value is None or value == "":
                issues.warn(xml_path, f"missing coordinate: <{key}> of object {index} ({name})", "box dropped")
                break
            try:
                coords.append(float(value))
            except ValueError:
                issues.warn(xml_path, f"non-numeric coordinate: <{key}> {value!r} of object {index} ({name})",
                            "box dropped")
                break
        if len(coords) == 4 and (coords[0] > coords[2] or coords[1] > coords[3]):
            # Checked on the XML's own numbers: after the 1-based inclusive conversion, xmax = xmin - 1 becomes a
            # zero-width box, and the message would blame the area instead of the swapped corners.
            flipped = "xmin > xmax" if coords[0] > coords[2] else "ymin > ymax"
            issues.warn(xml_path, f"inverted box ({flipped}): object {index} ({name}) "
                        f"({', '.join(f'{v:g}' for v in coords)})", "box dropped")
            objects.append((name, None, difficult))
            continue
        objects.append((name, coords if len(coords) == 4 else None, difficult))
    return filename, size, objects


def _find_image(root, image_id, filename):
    """``JPEGImages/<id>.jpg`` (the VOC convention; other extensions tried too), else the annotation's
    ``<filename>``. A missing image is reported under its conventional name."""
    directory = os.path.join(root, "JPEGImages")
    candidates = [image_id + ext for ext in IMAGE_EXTENSIONS]
    if filename:
        candidates.append(os.path.basename(filename))
    for name in candidates:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return os.path.join(directory, candidates[0])


def _index_image(root, image_id, inspect=True, split=None):
    """Parse one annotation and check its image (runs in a worker thread). Returns ``(item or None, issues)``."""
    issues = IssueCollector()
    xml_path = os.path.join(root, "Annotations", image_id + ".xml")
    inside = all(is_within(image_id, os.path.join(root, sub)) for sub in ("Annotations", "JPEGImages"))
    if "\0" in image_id or not inside:
        # An id like ../../etc/passwd in a split file: nothing outside the dataset is opened (or quoted in the log).
        issues.skip(split_file(root, split) if split else root,
                    f"image path outside the dataset: image id {image_id!r} leaves {root}", "image refused")
        return None, issues.issues
    parsed = _parse_xml(xml_path, issues)
    if parsed is None:
        return None, issues.issues
    filename, xml_size, objects = parsed
    item = {"id": image_id, "xml": xml_path, "objects": objects}
    if not inspect:
        return item, issues.issues
    image_path = _find_image(root, image_id, filename)
    try:
        info = inspect_image(image_path)
    except ImageProblem as err:
        issues.skip(image_path, str(err) + f" (annotation {xml_path})")
        return None, issues.issues
    if info.valid_rows:
        issues.warn(image_path, truncated_problem(info), TRUNCATED_ACTION)
    if xml_size is not None and (xml_size[0] <= 0 or xml_size[1] <= 0):
        xml_size = None
    width, height, orientation, problem = reconcile_size(info, xml_size)
    if xml_size is None:
        issues.warn(xml_path, "missing or invalid <size>", f"using the real image size {width}x{height}")
    elif problem == "orientation":
        # The annotation was made on the stored pixels, not on the EXIF-rotated image: keep the stored pixels.
        issues.warn(image_path, f"EXIF orientation disagrees with <size>: orientation {info.orientation} rotates "
                    f"the image but <size> in {xml_path} matches the stored pixels",
                    "EXIF orientation ignored for this image")
    elif problem == "size":
        issues.warn(xml_path, f"<size> disagrees with the real image: {xml_size[0]}x{xml_size[1]} in the "
                    f"annotation, {width}x{height} in {image_path}", "using the real image size")
    # VOC 1-based inclusive -> continuous 0-based (frcnn.boxes).
    valid = [(n, c, d) for n, c, d in objects if c is not None]
    raw = np.array([[c[0] - 1.0, c[1] - 1.0, c[2], c[3]] for _, c, _ in valid], np.float32).reshape(-1, 4)
    labels = [n for n, _, _ in valid]
    boxes, keep = check_boxes(raw, width, height, xml_path, issues, labels)
    item.update(
        file_name=image_path,
        width=width,
        height=height,
        orientation=orientation,
        valid_rows=info.valid_rows,
        boxes=boxes[keep],
        names=[n for n, k in zip(labels, keep) if k],
        difficult=np.array([d for (_, _, d), k in zip(valid, keep) if k], bool),
    )
    return item, issues.issues


def _index(roots, split, report, inspect=True):
    items = []
    for root in roots:
        ids = read_split_ids(root, split)
        with concurrent.futures.ThreadPoolExecutor(io_workers()) as pool:
            for item, issues in pool.map(lambda i: _index_image(root, i, inspect, split), ids):
                report.add(issues)  # in list order: strict mode raises for the first bad file
                if item is not None:
                    items.append(item)
    return items


def names_in(items):
    return tuple(sorted({name for item in items for name, _, _ in item["objects"]}))


def voc_class_names(cfg, split=None):
    """Sorted set of object names in the annotations of ``split`` (default: data.train_split) of all roots."""
    split = split or cfg.data.train_split
    report = Report(strict=False, log=False)  # problems are reported when the records are loaded, not here
    roots = _split_roots(cfg, split, report)
    names = names_in(_index(roots, split, report, inspect=False))
    if not names:
        raise DataError(f"no object names found in split '{split}' of data.root {cfg.data.root}: set data.classes")
    return names


def load_voc(cfg, split, class_names=None, report=None, format="voc"):
    """Records of ``split`` from all roots of ``cfg.data.root``.

    ``class_names``: the class list (without background); default ``cfg.data.classes``, else the sorted names in
    this split. Boxes of other names are dropped with a warning. Returns ``(RecordList, Report)``.
    """
    report = report if report is not None else Report(strict=cfg.data.strict)
    roots = _split_roots(cfg, split, report)
    items = _index(roots, split, report)
    if class_names is None:
        class_names = cfg.data.classes
    if class_names is None:
        class_names = names_in(items)
        if not class_names:
            raise DataError(f"no object names found in split '{split}' of data.root {cfg.data.root}: "
                            "set data.classes")
    class_names = tuple(class_names)
    ids = class_index(class_names)
    records = RecordList(class_names=class_names, format=format, split=split)
    unknown_logged = set()
    for item in items:
        names = item["names"]
        keep = np.array([n in ids for n in names], bool)
        for n in names:
            if n not in ids and (n, item["xml"]) not in unknown_logged:
                unknown_logged.add((n, item["xml"]))
                report.warn(item["xml"], f"unknown class: '{n}' is not in the class list {list(class_names)}",
                            "box dropped")
        difficult = item["difficult"][keep] if len(names) else np.zeros(0, bool)
        records.append(make_record(
            image_id=len(records),
            file_name=item["file_name"],
            width=item["width"],
            height=item["height"],
            boxes=item["boxes"][keep] if len(names) else np.zeros((0, 4), np.float32),
            classes=[ids[n] for n in names if n in ids],
            difficult=difficult,
            ignore=difficult,
            source_id=item["id"],
            orientation=item["orientation"],
            valid_rows=item["valid_rows"],
        ))
    return records, report
