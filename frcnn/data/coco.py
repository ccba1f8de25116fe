"""COCO reader: ``<root>/annotations/instances_<split>.json`` with images in ``<root>/<split>/`` (COCO 2017 layout).

Classes: COCO category ids (1..90 with gaps) map to contiguous class ids 1..C-1 in sorted category-id order (or in
the order of ``data.classes`` when given, matched by category name). ``RecordList.category_ids[i - 1]`` is the
original category id of class ``i``: the inverse mapping needed to write COCO results JSON. ``Record.source_id`` is
the COCO image id.

Boxes: COCO ``[x, y, w, h]`` (continuous pixel coordinates) -> ``(x, y, x + w, y + h)``. Crowd regions
(``iscrowd``) are kept with ``ignore`` set: never trained on, ignored by evaluation. Images without annotations are
kept (background-only training images), as are records for every image listed in the JSON whose file is sound.
"""

import collections
import concurrent.futures
import json
import os

import numpy as np

from frcnn.config import class_name_problem, data_roots
from frcnn.data.imageio import TRUNCATED_ACTION, ImageProblem, inspect_image, reconcile_size, truncated_problem
from frcnn.data.records import (DataError, IssueCollector, RecordList, Report, check_boxes, io_workers,
                                make_record, optional_int)
from frcnn.data.voc import check_root
from frcnn.fileio import is_within


def coco_paths(root, split):
    """``(annotation json, image directory)`` of ``split`` under a COCO root."""
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split)


def _coco_root(cfg):
    roots = data_roots(cfg)
    if len(roots) != 1:
        raise DataError(f"data.format coco takes one data.root, got {list(roots)}")
    root = os.path.abspath(roots[0])
    check_root(root)
    return root


def read_coco_json(path):
    """Parse an instances JSON; DataError naming the file when it is missing, not JSON or lacks a section."""
    if not os.path.isfile(path):
        raise DataError(f"annotation file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"annotation file {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation file {path}: the top level must be an object")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"annotation file {path}: no '{key}' list")
    data.setdefault("annotations", [])
    return data


def _categories(data, path):
    cats = {}
    for c in data["categories"]:
        try:
            cats[int(c["id"])] = str(c["name"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"annotation file {path}: malformed category {c!r}") from None
        problem = class_name_problem(cats[int(c["id"])])
        if problem:  # the class list is the categories: a bad name cannot be dropped without shifting the ids
            raise DataError(f"annotation file {path}: category id {c['id']} cannot be a class name: {problem}")
    return dict(sorted(cats.items()))


def coco_class_names(cfg, split=None):
    """Category names of ``split`` (default: data.train_split) in sorted category-id order."""
    split = split or cfg.data.train_split
    path, _ = coco_paths(_coco_root(cfg), split)
    return tuple(_categories(read_coco_json(path), path).values())


def _inspect(path):
    try:
        return inspect_image(path), None
    except ImageProblem as err:
        return None, str(err)


def load_coco(cfg, split, class_names=None, report=None):
    """Records of a COCO split. Returns ``(RecordList, Report)``; see the module docstring."""
    report = report if report is not None else Report(strict=cfg.data.strict)
    root = _coco_root(cfg)
    ann_path, image_dir = coco_paths(root, split)
    data = read_coco_json(ann_path)
    if not os.path.isdir(image_dir):
        raise DataError(f"image directory {image_dir} does not exist (split '{split}' of data.root {root})")
    cats = _categories(data, ann_path)

    if class_names is None:
        class_names = cfg.data.classes
    if class_names is None:
        class_names = tuple(cats.values())
        category_ids = tuple(cats)
    else:
        class_names = tuple(class_names)
        by_name = {}
        for cid, name in cats.items():
            by_name.setdefault(name, cid)
        for name in class_names:
            if name not in by_name:
                report.warn(ann_path, f"class not among the categories: '{name}'", "class has no boxes")
        category_ids = tuple(by_name.get(name) for name in class_names)
    cat_to_class = {cid: i for i, cid in enumerate(category_ids, start=1) if cid is not None}

    images = {}
    for entry in data["images"]:
        try:
            image_id = int(entry["id"])
            file_name = str(entry["file_name"])
        except (KeyError, TypeError, ValueError):
            report.warn(ann_path, f"malformed image entry: {str(entry)[:120]}", "entry ignored")
            continue
        if image_id in images:
            report.warn(ann_path, f"duplicate image id: {image_id}", "first entry used")
            continue
        if "\0" in file_name or not is_within(file_name, image_dir):
            # ../x.jpg or /etc/passwd: nothing outside the dataset is opened (or quoted in the log).
            report.skip(ann_path, f"image path outside the image folder: file_name {file_name!r} of image id "
                        f"{image_id} leaves {image_dir}", "image refused")
            continue
        images[image_id] = entry

    per_image = collections.defaultdict(list)
    missing_image = collections.Counter()
    missing_category = collections.Counter()
    other_category = collections.Counter()
    for ann in data["annotations"]:
        try:
            image_id = int(ann["image_id"])
            cid = int(ann["category_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            report.warn(ann_path, f"malformed annotation: {str(ann)[:120]}", "annotation ignored")
            continue
        if image_id not in images:
            missing_image[image_id] += 1
            continue
        if w < 0 or h < 0:
            # Named as such: converted to corners it would read as an inverted or empty box.
            report.warn(ann_path, f"negative {'width' if w < 0 else 'height'} in bbox [x, y, w, h] "
                        f"[{x:g}, {y:g}, {w:g}, {h:g}]: annotation id {ann.get('id')} of image id {image_id}",
                        "box dropped")
            continue
        if cid not in cats:
            missing_category[cid] += 1
            continue
        if cid not in cat_to_class:
            other_category[cats[cid]] += 1
            continue
        crowd = bool(ann.get("iscrowd", 0)) or bool(ann.get("ignore", 0))
        per_image[image_id].append((x, y, x + w, y + h, cat_to_class[cid], crowd, ann.get("id")))
    if missing_image:
        report.warn(ann_path, f"annotations reference missing images: {sum(missing_image.values())} annotations "
                    f"of {len(missing_image)} image ids not in 'images' (e.g. {sorted(missing_image)[:5]})",
                    "annotations ignored")
    if missing_category:
        report.warn(ann_path, f"annotations reference missing categories: {sum(missing_category.values())} "
                    f"annotations of category ids {sorted(missing_category)} not in 'categories'",
                    "annotations ignored")
    if other_category:
        report.warn(ann_path, f"unknown class: {sum(other_category.values())} boxes of categories not in "
                    f"data.classes ({', '.join(sorted(other_category))})", "boxes dropped")

    ordered = sorted(images)
    paths = [os.path.join(image_dir, str(images[i]["file_name"])) for i in ordered]
    with concurrent.futures.ThreadPoolExecutor(io_workers()) as pool:
        infos = list(pool.map(_inspect, paths))

    records = RecordList(class_names=class_names, format="coco", split=split, category_ids=category_ids,
                         annotation_file=ann_path)
    for image_id, path, (info, problem) in zip(ordered, paths, infos):
        if info is None:
            report.skip(path, f"{problem} (image id {image_id} in {ann_path})")
            continue
        issues = IssueCollector()
        entry = images[image_id]
        size = (optional_int(entry.get("width")), optional_int(entry.get("height")))
        size = None if None in size or min(size) <= 0 else size
        width, height, orientation, problem = reconcile_size(info, size)
        if info.valid_rows:
            issues.warn(path, truncated_problem(info) + f" (image id {image_id})", TRUNCATED_ACTION)
        if size is None:
            issues.warn(ann_path, f"missing or invalid size: image id {image_id}",
                        f"using the real image size {width}x{height}")
        elif problem == "orientation":
            issues.warn(path, f"EXIF orientation disagrees with the annotated size: orientation "
                        f"{info.orientation} rotates the image but image id {image_id} in {ann_path} has the "
                        "stored size", "EXIF orientation ignored for this image")
        elif problem == "size":
            issues.warn(ann_path, f"size disagrees with the real image: {size[0]}x{size[1]} for image id "
                        f"{image_id}, {width}x{height} in {path}", "using the real image size")
        anns = per_image.get(image_id, [])
        raw = np.array([a[:4] for a in anns], np.float32).reshape(-1, 4)
        labels = [f"annotation id {a[6]}" for a in anns]
        boxes, keep = check_boxes(raw, width, height, path, issues, labels)
        report.add(issues.issues)
        crowd = np.array([a[5] for a in anns], bool).reshape(-1)[keep]
        records.append(make_record(
            image_id=len(records),
            file_name=path,
            width=width,
            height=height,
            boxes=boxes[keep],
            classes=np.array([a[4] for a in anns], np.int32).reshape(-1)[keep],
            difficult=np.zeros(int(keep.sum()), bool),
            ignore=crowd,
            source_id=image_id,
            orientation=orientation,
            valid_rows=info.valid_rows,
        ))
    return records, report
