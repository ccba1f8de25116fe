"""frcnn.data: readers (VOC, COCO, shapes), bad-data handling, the two input pipelines (tf.data and NumPy), single-image
loading."""

import itertools
import json
import logging
import os
import struct

import cv2
import numpy as np
import pytest
import tensorflow as tf

from frcnn import data
from frcnn.config import config_from_dict
from frcnn.data import DataError, imageio, shapes, tf_pipeline

# ------------------------------------------------------------------------------------------------------- helpers


def make_cfg(root, fmt="voc", train="train", val="val", data_extra=None, input_extra=None, synthetic=None):
    d = {"format": fmt, "root": root, "train_split": train, "val_split": val}
    d.update(data_extra or {})
    if synthetic:
        d["synthetic"] = synthetic
    inp = {"min_size": 64, "max_size": 128, "size_divisibility": 32, "max_gt": 8}
    inp.update(input_extra or {})
    return config_from_dict({"data": d, "input": inp})


def write_image(path, image_rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = image_rgb if image_rgb.ndim == 2 else image_rgb[..., ::-1]
    assert cv2.imwrite(str(path), image)


def noise_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def voc_xml(filename, size, objects):
    """``objects``: dicts with name, box (xmin, ymin, xmax, ymax as written), optional difficult; None parts are
    left out (to write broken files)."""
    parts = ["<annotation>", f"<filename>{filename}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for obj in objects:
        parts.append("<object>")
        if obj.get("name") is not None:
            parts.append(f"<name>{obj['name']}</name>")
        parts.append(f"<difficult>{int(obj.get('difficult', 0))}</difficult>")
        if obj.get("box") is not None:
            parts.append("<bndbox>")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"]):
                if value is not None:
                    parts.append(f"<{key}>{value}</{key}>")
            parts.append("</bndbox>")
        parts.append("</object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def make_voc(root, entries, split="train"):
    """``entries``: ``(image_id, image array or None, objects, size or 'real')``. Writes a VOC root."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = []
    for image_id, image, objects, size in entries:
        if image is not None:
            write_image(os.path.join(root, "JPEGImages", image_id + ".jpg"), image)
            if size == "real":
                size = (image.shape[1], image.shape[0])
        with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
            f.write(voc_xml(image_id + ".jpg", size, objects))
        ids.append(image_id)
    with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    return str(root)


PIPELINES = ("tf", "numpy")


def as_numpy(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def take(ds, n=None):
    """The first ``n`` batches (all with None) of either pipeline's dataset, as dicts of NumPy arrays."""
    return [as_numpy(b) for b in itertools.islice(iter(ds), n)]


def first_batch(ds):
    return take(ds, 1)[0]


def exif_jpeg_bytes(image_rgb, orientation):
    """A JPEG with an EXIF APP1 segment holding only the orientation tag."""
    ok, encoded = cv2.imencode(".jpg", image_rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])
    encoded = encoded.tobytes()
    tiff = (b"MM" + struct.pack(">HI", 42, 8) + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0))
    body = b"Exif\x00\x00" + tiff
    return encoded[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + encoded[2:]


# --------------------------------------------------------------------------------------------------------- VOC


def test_voc_parsing_exact(tmp_path):
    root = make_voc(tmp_path / "voc", [
        ("a", noise_image(60, 80), [{"name": "dog", "box": (11, 21, 50, 60)},
                                    {"name": "cat", "box": (1, 1, 80, 60), "difficult": 1}], "real"),
        ("b", noise_image(50, 40, 1), [{"name": "cat", "box": (5.5, 6.25, 30.75, 40)}], "real"),
        ("c", noise_image(30, 30, 2), [], "real"),
    ])
    cfg = make_cfg(root)
    assert data.resolve_classes(cfg).data.classes == ("cat", "dog")
    records, names, report = data.load_records(cfg, "train")
    assert names == ("cat", "dog") and not report
    a, b, c = records
    assert [r.image_id for r in records] == [0, 1, 2]
    assert a.file_name == os.path.join(root, "JPEGImages", "a.jpg") and os.path.isabs(a.file_name)
    assert (a.width, a.height, a.source_id) == (80, 60, "a")
    np.testing.assert_array_equal(a.boxes, np.array([[10, 20, 50, 60], [0, 0, 80, 60]], np.float32))
    assert a.boxes.dtype == np.float32 and a.classes.dtype == np.int32
    np.testing.assert_array_equal(a.classes, [2, 1])
    np.testing.assert_array_equal(a.difficult, [False, True])
    np.testing.assert_array_equal(a.ignore, [False, True])
    np.testing.assert_allclose(b.boxes, [[4.5, 5.25, 30.75, 40]])  # fractional coordinates accepted
    assert c.num_boxes == 0 and c.boxes.shape == (0, 4)  # no objects: a valid background-only record
    text = data.summary(records, names, report)
    assert "3 images (1 without objects)" in text and "cat" in text and "dog" in text


def test_voc_given_classes_unknown_name_skipped(tmp_path):
    root = make_voc(tmp_path / "voc", [
        ("a", noise_image(40, 40), [{"name": "dog", "box": (1, 1, 10, 10)}, {"name": "cat", "box": (2, 2, 9, 9)}],
         "real"),
    ])
    cfg = make_cfg(root, data_extra={"classes": ["dog"]})
    records, names, report = data.load_records(cfg, "train")
    assert names == ("dog",)
    np.testing.assert_array_equal(records[0].classes, [1])
    assert any("unknown class" in w.problem and "'cat'" in w.problem for w in report.warnings)
    with pytest.raises(DataError, match="a.xml"):
        data.load_records(make_cfg(root, data_extra={"classes": ["dog"], "strict": True}), "train")


def test_voc_val_uses_train_classes_and_roots_join(tmp_path):
    r1 = make_voc(tmp_path / "r1", [("a", noise_image(20, 20), [{"name": "dog", "box": (1, 1, 10, 10)}], "real")])
    make_voc(tmp_path / "r1", [("b", noise_image(20, 20), [{"name": "cat", "box": (1, 1, 10, 10)},
                                                           {"name": "dog", "box": (1, 1, 5, 5)}], "real")],
             split="val")
    r2 = make_voc(tmp_path / "r2", [("x", noise_image(20, 20), [{"name": "bird", "box": (1, 1, 10, 10)}], "real")])
    cfg = make_cfg([r1, r2])
    assert data.resolve_classes(cfg).data.classes == ("bird", "dog")
    records, names, _ = data.load_records(cfg, "train")
    assert [r.source_id for r in records] == ["a", "x"] and [r.image_id for r in records] == [0, 1]
    records, names, report = data.load_records(cfg, "val")  # only r1 has val; cat is not a train class
    assert names == ("bird", "dog") and len(records) == 1
    np.testing.assert_array_equal(records[0].classes, [2])
    problems = [w.problem for w in report.warnings]
    assert any("split 'val' missing" in p for p in problems) and any("'cat'" in p for p in problems)


def test_missing_root_and_split_are_data_errors(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="data.root .*nowhere"):
        data.load_records(make_cfg(missing), "train")
    with pytest.raises(DataError, match="data.root .*nowhere"):
        data.resolve_classes(make_cfg(missing))
    root = make_voc(tmp_path / "voc", [("a", noise_image(20, 20), [{"name": "dog", "box": (1, 1, 5, 5)}], "real")])
    with pytest.raises(DataError, match=r"ImageSets/Main/test\.txt"):
        data.load_records(make_cfg(root), "test")
    with pytest.raises(DataError, match=r"instances_train\.json"):
        data.load_records(make_cfg(str(tmp_path), fmt="coco"), "train")


def _bad_voc(tmp_path):
    """One image per bad-data case, plus two good ones. Returns (root, {case: image id})."""
    good = noise_image(40, 60)
    root = str(tmp_path / "bad")
    entries = [
        ("good", good, [{"name": "dog", "box": (11, 11, 30, 30)}], "real"),
        ("empty_ok", noise_image(30, 30), [], "real"),
        ("missing_image", None, [{"name": "dog", "box": (1, 1, 5, 5)}], (50, 50)),
        ("no_name", good, [{"name": None, "box": (1, 1, 5, 5)}, {"name": "dog", "box": (2, 2, 9, 9)}], "real"),
        ("no_bndbox", good, [{"name": "dog", "box": None}], "real"),
        ("no_coord", good, [{"name": "dog", "box": (1, 1, None, 5)}], "real"),
        ("text_coord", good, [{"name": "dog", "box": (1, "abc", 5, 5)}], "real"),
        ("inverted", good, [{"name": "dog", "box": (10, 10, 9, 20)}, {"name": "dog", "box": (1, 1, 5, 5)}], "real"),
        ("outside", good, [{"name": "dog", "box": (-4, 11, 70, 30)}, {"name": "dog", "box": (65, 1, 90, 9)}],
         "real"),
        ("wrong_size", good, [{"name": "dog", "box": (1, 1, 5, 5)}], (600, 400)),
        ("no_size", good, [{"name": "dog", "box": (1, 1, 5, 5)}], None),
        ("unknown", good, [{"name": "zebra", "box": (1, 1, 5, 5)}], "real"),
        ("empty_file", good, [], "real"),
        ("not_image", good, [], "real"),
        ("truncated", good, [], "real"),
        ("bad_xml", good, [], "real"),
        ("no_xml", good, [], "real"),
    ]
    make_voc(root, entries)
    jpg = lambda name: os.path.join(root, "JPEGImages", name + ".jpg")  # noqa: E731
    open(jpg("empty_file"), "wb").close()
    with open(jpg("not_image"), "w") as f:
        f.write("this is not an image")
    with open(jpg("truncated"), "rb") as f:
        content = f.read()
    with open(jpg("truncated"), "wb") as f:
        f.write(content[: len(content) // 2])
    with open(os.path.join(root, "Annotations", "bad_xml.xml"), "w") as f:
        f.write("<annotation><object><name>dog</name>")
    os.remove(os.path.join(root, "Annotations", "no_xml.xml"))
    return root


# case -> (file that must be named, words of the problem, skipped image?)
BAD_CASES = {
    "missing_image": ("missing_image.jpg", "image file is missing", True),
    "no_name": ("no_name.xml", "missing <name>", False),
    "no_bndbox": ("no_bndbox.xml", "missing <bndbox>", False),
    "no_coord": ("no_coord.xml", "missing coordinate: <xmax>", False),
    "text_coord": ("text_coord.xml", "non-numeric coordinate: <ymin> 'abc'", False),
    "inverted": ("inverted.xml", "inverted box (xmin > xmax): object 0 (dog) (10, 10, 9, 20)", False),
    "outside": ("outside.xml", "box outside the image", False),
    "wrong_size": ("wrong_size.xml", "<size> disagrees with the real image: 600x400", False),
    "no_size": ("no_size.xml", "missing or invalid <size>", False),
    "unknown": ("unknown.xml", "unknown class: 'zebra'", False),
    "empty_file": ("empty_file.jpg", "image file is empty", True),
    "not_image": ("not_image.jpg", "not a JPEG, PNG", True),
    "truncated": ("truncated.jpg", "truncated JPEG", True),
    "bad_xml": ("bad_xml.xml", "not valid XML", True),
    "no_xml": ("no_xml.xml", "annotation file missing", True),
}


def test_bad_data_is_reported_and_skipped(tmp_path, caplog):
    root = _bad_voc(tmp_path)
    cfg = make_cfg(root, data_extra={"classes": ["dog"]})
    with caplog.at_level(logging.WARNING, logger="frcnn.data"):
        records, names, report = data.load_records(cfg, "train")
    for case, (file_part, problem, skipped) in BAD_CASES.items():
        issues = report.skipped if skipped else report.warnings
        hits = [i for i in issues if i.path.endswith(file_part) and problem in i.problem]
        assert hits, f"{case}: no issue '{problem}' for {file_part}"
        assert any(file_part in r.getMessage() for r in caplog.records), f"{case} not logged"
    skipped_ids = {os.path.splitext(os.path.basename(p))[0] for p in report.skipped_files}
    assert skipped_ids == {c for c, (_, _, s) in BAD_CASES.items() if s}
    by_id = {r.source_id: r for r in records}
    assert set(by_id) == {"good", "empty_ok"} | {c for c, (_, _, s) in BAD_CASES.items() if not s}
    np.testing.assert_array_equal(by_id["no_name"].boxes, [[1, 1, 9, 9]])
    assert by_id["no_bndbox"].num_boxes == 0 and by_id["text_coord"].num_boxes == 0
    np.testing.assert_array_equal(by_id["inverted"].boxes, [[0, 0, 5, 5]])
    np.testing.assert_array_equal(by_id["outside"].boxes, [[0, 10, 60, 30]])  # clipped; the other dropped
    assert (by_id["wrong_size"].width, by_id["wrong_size"].height) == (60, 40)  # the real image wins
    assert by_id["unknown"].num_boxes == 0 and by_id["empty_ok"].num_boxes == 0
    text = data.summary(records, names, report)
    assert f"skipped files: {len(report.skipped)}" in text and "truncated.jpg" in text
    # Training goes on with what is left.
    batch = first_batch(data.build_dataset(cfg, records, training=True, batch_size=4))
    assert batch["images"].shape[0] == 4


@pytest.mark.parametrize("case", ["missing_image", "text_coord", "inverted", "outside", "truncated", "bad_xml"])
def test_strict_mode_raises_naming_the_file(tmp_path, case):
    root = _bad_voc(tmp_path)
    with open(os.path.join(root, "ImageSets", "Main", "train.txt"), "w") as f:
        f.write(f"good\n{case}\n")
    cfg = make_cfg(root, data_extra={"classes": ["dog"], "strict": True})
    file_part, problem, _ = BAD_CASES[case]
    with pytest.raises(DataError, match=file_part) as err:
        data.load_records(cfg, "train")
    assert problem in str(err.value)


def test_header_parser_formats(tmp_path):
    image = noise_image(37, 53)
    for ext in (".jpg", ".png", ".bmp"):
        path = str(tmp_path / ("x" + ext))
        write_image(path, image)
        info = data.inspect_image(path)
        assert (info.width, info.height, info.orientation) == (53, 37, 1), ext
    gray = str(tmp_path / "g.png")
    write_image(gray, image[..., 0])
    assert data.inspect_image(gray).width == 53
    progressive = str(tmp_path / "p.jpg")
    assert cv2.imwrite(progressive, image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert (data.inspect_image(progressive).width, data.inspect_image(progressive).height) == (53, 37)
    rotated = tmp_path / "r.jpg"
    rotated.write_bytes(exif_jpeg_bytes(image, 6))
    info = data.inspect_image(str(rotated))
    assert (info.width, info.height, info.orientation) == (37, 53, 6)
    from PIL import Image

    for fmt in ("GIF", "WEBP"):
        path = str(tmp_path / ("x." + fmt.lower()))
        Image.fromarray(image).save(path, fmt)
        info = data.inspect_image(path)
        assert (info.width, info.height, info.format) == (53, 37, fmt.lower()), fmt
        assert data.load_image(path).shape == (37, 53, 3)
    tiff = str(tmp_path / "x.tiff")  # not a format of the pipelines: inference still reads it (OpenCV)
    write_image(tiff, image)
    with pytest.raises(imageio.UnknownFormat):
        data.inspect_image(tiff)
    np.testing.assert_array_equal(data.load_image(tiff), image)


# -------------------------------------------------------------------------------------------------------- COCO


def _coco(tmp_path, extra_anns=(), images_missing=("c.jpg",)):
    root = tmp_path / "coco"
    write_image(str(root / "train2017" / "a.jpg"), noise_image(40, 60))
    write_image(str(root / "train2017" / "b.jpg"), noise_image(30, 30, 1))
    doc = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 60, "height": 40},
            {"id": 3, "file_name": "b.jpg", "width": 31, "height": 30},  # wrong width
            {"id": 9, "file_name": "c.jpg", "width": 10, "height": 10},  # file missing
        ],
        "categories": [{"id": 5, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 5, 20.5, 10], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 60, 40], "iscrowd": 1},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [1, 1, 0, 5], "iscrowd": 0},  # zero area
            {"id": 4, "image_id": 3, "category_id": 3, "bbox": [20, 20, 20, 5], "iscrowd": 0},  # sticks out
            {"id": 5, "image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # no such image
            {"id": 6, "image_id": 7, "category_id": 42, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # no such category
            *extra_anns,
        ],
    }
    os.makedirs(root / "annotations")
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    return str(root)


def test_coco_reader(tmp_path):
    root = _coco(tmp_path)
    cfg = make_cfg(root, fmt="coco", train="train2017", val="val2017")
    assert data.resolve_classes(cfg).data.classes == ("person", "car", "zebra")  # sorted category id order
    records, names, report = data.load_records(cfg, "train2017")
    assert names == ("person", "car", "zebra") and records.category_ids == (1, 3, 5)
    assert records.annotation_file.endswith("instances_train2017.json")
    assert [r.source_id for r in records] == [3, 7] and [r.image_id for r in records] == [0, 1]  # by image id
    b, a = records
    np.testing.assert_allclose(a.boxes, [[10, 5, 30.5, 15], [0, 0, 60, 40]])
    np.testing.assert_array_equal(a.classes, [3, 1])
    np.testing.assert_array_equal(a.ignore, [False, True])  # crowd: ignored, never trained on
    np.testing.assert_array_equal(a.difficult, [False, False])
    assert not a.train_mask(use_difficult=True)[1]
    assert (b.width, b.height) == (30, 30)
    np.testing.assert_allclose(b.boxes, [[20, 20, 30, 25]])
    problems = [i.problem for i in report.warnings]
    for words in ("zero-area box", "box outside the image", "reference missing images", "missing categories",
                  "size disagrees with the real image: 31x30"):
        assert any(words in p for p in problems), words
    assert len(report.skipped) == 1 and report.skipped[0].path.endswith("c.jpg")
    assert "image file is missing" in report.skipped[0].problem

    sub = make_cfg(root, fmt="coco", train="train2017", data_extra={"classes": ["zebra", "car"]})
    records, names, report = data.load_records(sub, "train2017")
    assert names == ("zebra", "car") and records.category_ids == (5, 3)
    np.testing.assert_array_equal(records[1].classes, [1])
    assert any("unknown class" in i.problem and "person" in i.problem for i in report.warnings)

    strict = make_cfg(root, fmt="coco", train="train2017", data_extra={"strict": True})
    with pytest.raises(DataError, match="instances_train2017.json"):
        data.load_records(strict, "train2017")


# ------------------------------------------------------------------------------------------------------ shapes


def _shapes_cfg(root, **synthetic):
    s = {"num_train": 6, "num_val": 2, "image_size": 128, "max_objects": 3, "seed": 3}
    s.update(synthetic)
    return make_cfg(str(root), fmt="shapes", synthetic=s, input_extra={"min_size": 128, "max_size": 128})


def _tree_bytes(root):
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_shapes_deterministic_voc_layout_and_reused(tmp_path, monkeypatch):
    cfg = _shapes_cfg(tmp_path / "s1")
    records, names, report = data.load_records(cfg, "train")
    assert names == shapes.SHAPE_CLASSES and len(records) == 6 and not report
    assert data.resolve_classes(cfg).data.classes == shapes.SHAPE_CLASSES
    root = str(tmp_path / "s1")
    for path in ("JPEGImages/train_00000.jpg", "Annotations/val_00001.xml", "ImageSets/Main/train.txt",
                 "ImageSets/Main/val.txt", "shapes.json"):
        assert os.path.isfile(os.path.join(root, path)), path
    data.load_records(_shapes_cfg(tmp_path / "s2"), "val")
    assert _tree_bytes(root) == _tree_bytes(str(tmp_path / "s2"))  # same seed, same bytes
    assert _tree_bytes(root) != _tree_bytes(data.shapes.ensure_shapes(_shapes_cfg(tmp_path / "s3", seed=4)))

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(shapes, "_write", fail)
    val, _, _ = data.load_records(cfg, "val")  # re-used: no generation
    assert len(val) == 2
    monkeypatch.undo()

    os.remove(os.path.join(root, "JPEGImages", "train_00003.jpg"))  # incomplete -> generated again
    data.load_records(cfg, "train")
    assert os.path.isfile(os.path.join(root, "JPEGImages", "train_00003.jpg"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".shapes-")]


def test_shapes_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = shapes.render_image

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(shapes, "render_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        data.load_records(_shapes_cfg(tmp_path / "s"), "train")
    assert os.listdir(tmp_path) == []


def test_shapes_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(DataError, match="mine"):
        data.load_records(_shapes_cfg(tmp_path / "mine"), "train")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


@pytest.fixture(scope="module")
def default_shapes(tmp_path_factory):
    """The default-size shapes dataset (96 + 24 images of 256 px), generated once for the module."""
    import time

    root = tmp_path_factory.mktemp("shapes") / "shapes"
    cfg = make_cfg(str(root), fmt="shapes", input_extra={"min_size": 256, "max_size": 256, "max_gt": 8})
    start = time.perf_counter()
    train, names, _ = data.load_records(cfg, "train")
    seconds = time.perf_counter() - start
    return cfg, train, names, seconds


def test_shapes_default_content(default_shapes):
    cfg, train, names, seconds = default_shapes
    assert seconds < 15.0, f"generating 120 images took {seconds:.1f} s"
    assert len(train) == 96 and all((r.width, r.height) == (256, 256) for r in train)
    counts = [r.num_boxes for r in train]
    assert 1 <= counts.count(0) <= 10 and max(counts) <= 4
    classes = np.concatenate([r.classes for r in train])
    assert set(classes.tolist()) == {1, 2, 3}
    boxes = np.concatenate([r.boxes for r in train])
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert sides.min() >= 12 and sides.max() <= 128
    assert np.all(boxes >= 0) and np.all(boxes <= 256)


# ---------------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipeline_batch_contract(default_shapes, pipeline):
    cfg, train, names, _ = default_shapes
    ds = data.build_dataset(cfg, train, training=True, batch_size=4, pipeline=pipeline)
    batch = first_batch(ds)
    g = cfg.input.max_gt
    expect = {"images": ((4, 256, 256, 3), np.float32), "image_sizes": ((4, 2), np.int32), "scales": ((4,), np.float32),
              "gt_boxes": ((4, g, 4), np.float32), "gt_classes": ((4, g), np.int32), "gt_valid": ((4, g), bool),
              "image_ids": ((4,), np.int64)}
    for key, (shape, dtype) in expect.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    assert 0 <= batch["images"].min() and batch["images"].max() <= 255
    for i, image_id in enumerate(batch["image_ids"]):
        record = train[image_id]
        k = record.num_boxes
        np.testing.assert_array_equal(batch["gt_valid"][i], np.arange(g) < k)
        assert np.all(batch["gt_boxes"][i, k:] == 0) and np.all(batch["gt_classes"][i, k:] == 0)
        np.testing.assert_array_equal(np.sort(batch["gt_classes"][i, :k]), np.sort(record.classes))
        assert np.all(batch["gt_classes"][i, :k] >= 1)
    # Training order: shuffled, the same for the same seed, every image once per epoch (96 = 24 batches of 4).
    def epochs(n):
        return [i for b in take(data.build_dataset(cfg, train, True, 4, pipeline=pipeline), 24 * n)
                for i in b["image_ids"]]

    two = epochs(2)
    assert sorted(two[:96]) == sorted(two[96:]) == list(range(96))
    assert two[:96] != list(range(96)) and two[:96] != two[96:]  # reshuffled each epoch
    assert epochs(1) == two[:96]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipeline_resize_pad_and_eval_order(tmp_path, pipeline):
    root = make_voc(tmp_path / "voc", [
        ("a", noise_image(100, 200), [{"name": "dog", "box": (11, 21, 50, 60)}], "real"),  # scale 1.5
        ("b", noise_image(100, 400, 1), [{"name": "dog", "box": (1, 1, 400, 100)}], "real"),  # capped: 1.25
        ("c", noise_image(90, 90, 2), [], "real"),
    ])
    cfg = make_cfg(root, input_extra={"min_size": 150, "max_size": 500, "size_divisibility": 32})
    records, _, _ = data.load_records(cfg, "train")
    ds = data.build_dataset(cfg, records, training=False, batch_size=2, pipeline=pipeline)
    batches = take(ds)
    assert [b["image_ids"].tolist() for b in batches] == [[0, 1], [2]]  # record order, last batch smaller
    b0 = batches[0]
    np.testing.assert_array_equal(b0["scales"], np.float32([1.5, 1.25]))
    np.testing.assert_array_equal(b0["image_sizes"], [[150, 300], [125, 500]])
    assert b0["images"].shape == (2, 160, 512, 3)  # padded up to multiples of 32
    np.testing.assert_array_equal(b0["gt_boxes"][0, 0], np.float32([10, 20, 50, 60]) * np.float32(1.5))
    np.testing.assert_array_equal(b0["gt_boxes"][1, 0], [0, 0, 500, 125])
    assert np.all(b0["images"][0, 150:] == 0) and np.all(b0["images"][0, :, 300:] == 0)  # zero padding
    np.testing.assert_allclose(b0["gt_boxes"][0, 0] / b0["scales"][0], records[0].boxes[0], atol=1e-5)
    assert batches[1]["images"].shape == (1, 160, 160, 3)
    assert not batches[1]["gt_valid"].any()
    again = [b["image_ids"].tolist() for b in take(data.build_dataset(cfg, records, False, 2, pipeline=pipeline))]
    assert again == [[0, 1], [2]]

    fixed = make_cfg(root, input_extra={"min_size": 150, "max_size": 500, "fixed_size": True})
    b = first_batch(data.build_dataset(fixed, records, training=True, batch_size=3, pipeline=pipeline))
    assert b["images"].shape == (3, 512, 512, 3)
    if pipeline == "tf":
        spec = data.build_dataset(fixed, records, training=True, batch_size=3, pipeline="tf").element_spec
        assert spec["images"].shape.as_list() == [3, 512, 512, 3]  # static shapes for XLA


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipeline_flip_moves_boxes_with_content(tmp_path, pipeline):
    image = np.zeros((64, 96, 3), np.uint8)
    image[10:30, 5:25] = 255  # one bright box, pixels x 5..24, y 10..29
    root = str(tmp_path / "voc")
    os.makedirs(os.path.join(root, "JPEGImages"))
    cv2.imwrite(os.path.join(root, "JPEGImages", "a.png"), image)
    make_voc(root, [("a", None, [{"name": "dog", "box": (6, 11, 25, 30)}], (96, 64))])
    with open(os.path.join(root, "Annotations", "a.xml")) as f:
        xml = f.read().replace("a.jpg", "a.png")
    with open(os.path.join(root, "Annotations", "a.xml"), "w") as f:
        f.write(xml)
    cfg = make_cfg(root, input_extra={"min_size": 128, "max_size": 256, "flip": True})
    records, _, report = data.load_records(cfg, "train")
    assert not report and records[0].file_name.endswith("a.png")
    ds = data.build_dataset(cfg, records, training=True, batch_size=1, pipeline=pipeline)
    seen = set()
    for batch in take(ds, 12):
        img = batch["images"][0]
        box = batch["gt_boxes"][0, 0]
        h, w = batch["image_sizes"][0]
        assert (h, w) == (128, 192)
        bright = img[:h, :w, 0] > 127
        ys, xs = np.nonzero(bright)
        content = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        np.testing.assert_allclose(box, content, atol=1.0)
        seen.add(bool(box[0] > w / 2))
    assert seen == {True, False}  # both flipped and unflipped draws
    # Reproducible: the same seed gives the same flips (per-image stateless seeds, even with a parallel map).
    def flips():
        return [b["gt_boxes"][0, 0, 0] for b in take(data.build_dataset(cfg, records, True, 1, pipeline=pipeline), 12)]

    assert flips() == flips()
    expected_flipped = np.float32([192 - 50, 20, 192 - 10, 60])
    flips = [b["gt_boxes"][0, 0] for b in take(ds, 12)]
    assert any(np.array_equal(f, expected_flipped) for f in flips)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipeline_difficult_and_max_gt(tmp_path, caplog, pipeline):
    objects = [{"name": "dog", "box": (1 + i, 1, 10 + i, 10)} for i in range(6)]
    objects[1]["difficult"] = 1
    root = make_voc(tmp_path / "voc", [("a", noise_image(40, 40), objects, "real")])
    cfg = make_cfg(root, input_extra={"max_gt": 4, "flip": False})
    records, _, _ = data.load_records(cfg, "train")
    with caplog.at_level(logging.WARNING, logger="frcnn.data"):
        b = first_batch(data.build_dataset(cfg, records, training=True, batch_size=1, pipeline=pipeline))
    assert b["gt_valid"][0].tolist() == [True] * 4
    scale = b["scales"][0]
    np.testing.assert_allclose(b["gt_boxes"][0, :, 0] / scale, [0, 2, 3, 4], atol=1e-5)  # difficult #1 left out
    assert sum("input.max_gt=4" in r.getMessage() for r in caplog.records) == 1
    cfg = make_cfg(root, data_extra={"use_difficult": True}, input_extra={"max_gt": 8, "flip": False})
    b = first_batch(data.build_dataset(cfg, records, training=True, batch_size=1, pipeline=pipeline))
    assert b["gt_valid"][0].sum() == 6


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipeline_skips_images_failing_at_decode_time(tmp_path, caplog, pipeline):
    root = make_voc(tmp_path / "voc", [
        ("a", noise_image(40, 40), [], "real"),
        ("b", noise_image(40, 40, 1), [], "real"),
        ("c", noise_image(40, 40, 2), [], "real"),
        ("d", noise_image(40, 40, 3), [], "real"),
    ])
    # b: a PNG whose header and IEND pass the index-time checks but whose data is garbage.
    png = cv2.imencode(".png", noise_image(40, 40))[1].tobytes()
    with open(os.path.join(root, "JPEGImages", "b.jpg"), "wb") as f:
        f.write(png[:60] + b"\x00" * 200 + b"IEND\xaeB`\x82")
    cfg = make_cfg(root, data_extra={"classes": ["dog"]})
    records, _, report = data.load_records(cfg, "train")
    assert len(records) == 4 and not report
    os.remove(os.path.join(root, "JPEGImages", "d.jpg"))  # deleted after indexing
    with caplog.at_level(logging.WARNING, logger="frcnn.data"):
        ids = [i for b in take(data.build_dataset(cfg, records, False, 1, pipeline=pipeline)) for i in b["image_ids"]]
        assert ids == [0, 2]
        pairs = [b["image_ids"].tolist() for b in take(data.build_dataset(cfg, records, False, 2, pipeline=pipeline))]
        assert pairs == [[0, 2]]  # regrouped: only the last batch may be smaller
        train = data.build_dataset(cfg, records, training=True, batch_size=2, pipeline=pipeline)
        assert sorted({i for b in take(train, 4) for i in b["image_ids"]}) == [0, 2]
    for name in ("b.jpg", "d.jpg"):  # named once per dataset, with the reason
        named = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(named) == 3 and all("image does not decode (" in m for m in named), named

    checked_report = data.Report()
    checked = data.check_decodable(records, checked_report, pipeline=pipeline)
    assert [r.source_id for r in checked] == ["a", "c"] and [r.image_id for r in checked] == [0, 1]
    assert {os.path.basename(p) for p in checked_report.skipped_files} == {"b.jpg", "d.jpg"}

    strict = make_cfg(root, data_extra={"classes": ["dog"], "strict": True})
    with pytest.raises(tf.errors.OpError if pipeline == "tf" else DataError):
        take(data.build_dataset(strict, records, training=False, batch_size=1, pipeline=pipeline))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipeline_no_objects_and_empty_records(tmp_path, pipeline):
    root = make_voc(tmp_path / "voc", [("a", noise_image(40, 40), [], "real")])
    with pytest.raises(DataError, match="no object names"):
        data.load_records(make_cfg(root), "train")
    cfg = make_cfg(root, data_extra={"classes": ["dog"]})
    records, _, _ = data.load_records(cfg, "train")
    b = first_batch(data.build_dataset(cfg, records, training=True, batch_size=2, pipeline=pipeline))
    assert not b["gt_valid"].any() and b["gt_boxes"].shape == (2, 8, 4)
    with pytest.raises(DataError, match="no images"):
        data.build_dataset(cfg, [], training=True, pipeline=pipeline)


# ------------------------------------------------------------------------------------------- images and EXIF


def test_grayscale_rgba_and_exif(tmp_path):
    rgb = noise_image(30, 50)
    gray_path, rgba_path = str(tmp_path / "g.png"), str(tmp_path / "rgba.png")
    cv2.imwrite(gray_path, rgb[..., 0])
    rgba = np.concatenate([rgb[..., ::-1], np.full((30, 50, 1), 128, np.uint8)], axis=2)  # BGRA for OpenCV
    cv2.imwrite(rgba_path, rgba)
    gray = data.load_image(gray_path)
    assert gray.shape == (30, 50, 3) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_array_equal(data.load_image(rgba_path), rgb)
    for path in (gray_path, rgba_path):
        decoded = tf_pipeline.decode_image(tf.io.read_file(path)).numpy()
        np.testing.assert_array_equal(decoded, data.load_image(path))

    # EXIF orientation 6 (rotate 90 clockwise): load_image and the pipeline agree, sizes are the rotated ones.
    image = np.zeros((40, 60, 3), np.uint8)
    image[:10, :20] = (255, 0, 0)
    path = tmp_path / "rot.jpg"
    path.write_bytes(exif_jpeg_bytes(image, 6))
    loaded = data.load_image(str(path))
    assert loaded.shape == (60, 40, 3)
    assert loaded[:20, -10:, 0].mean() > 200  # top-left red block now at the top right
    for orientation in range(1, 9):
        path.write_bytes(exif_jpeg_bytes(image, orientation))
        ours = tf_pipeline.apply_orientation(tf_pipeline.decode_image(tf.io.read_file(str(path))), orientation).numpy()
        assert np.abs(ours.astype(int) - data.load_image(str(path))).max() < 40, orientation

    with pytest.raises(DataError, match="nope.jpg"):
        data.load_image(str(tmp_path / "nope.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match="bad.jpg"):
        data.load_image(str(bad))


# ----------------------------------------------------------------------------------------------------- raccoon


def test_raccoon(raccoon_root):
    cfg = make_cfg(raccoon_root, input_extra={"min_size": 128, "max_size": 256})
    assert data.resolve_classes(cfg).data.classes == ("raccoon",)
    train, names, report = data.load_records(cfg, "train")
    val, _, val_report = data.load_records(cfg, "val")
    assert names == ("raccoon",) and not report and not val_report
    assert (len(train), len(val)) == (160, 40)
    assert sum(r.num_boxes for r in train) == 175 and sum(r.num_boxes for r in val) == 42
    assert all(np.all(r.classes == 1) for r in train + val)
    by_name = {os.path.basename(r.file_name): r for r in train + val}
    for name in ("raccoon-150.jpg", "raccoon-152.jpg", "raccoon-161.jpg"):  # grayscale JPEGs
        record = by_name[name]
        image = data.load_image(record.file_name)
        assert image.shape == (record.height, record.width, 3)
        decoded = tf_pipeline.decode_image(tf.io.read_file(record.file_name))
        assert decoded.shape == (record.height, record.width, 3)
    batch = first_batch(data.build_dataset(cfg, val, training=False, batch_size=8))
    assert batch["images"].shape[0] == 8 and batch["images"].shape[-1] == 3
    assert batch["gt_valid"].sum() == sum(val[i].num_boxes for i in batch["image_ids"])
