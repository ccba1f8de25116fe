"""Reliability round two (runs that collide, disks that fill, results that lie, images that half-decode).

Every test builds its own small files in tmp_path and uses tiny Keras models (no detector), so the file runs fast.
"""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------- defect 4: results files


def _annotations(tmp_path):
    gt = {
        "images": [{"id": 1, "width": 100, "height": 80, "file_name": "1.jpg"},
                   {"id": 2, "width": 100, "height": 80, "file_name": "2.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600,
                         "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [50, 30, 20, 20], "area": 400,
                         "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return str(path)


GOOD = {"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "score": 0.9}


@pytest.mark.parametrize("bad, words", [
    ({"image_id": 2, "category_id": 3, "bbox": [float("nan")] * 4, "score": 0.8}, "non-finite"),
    ({"image_id": 2, "category_id": 3, "bbox": [50, 30, -20, 20], "score": 0.8}, "not positive"),
    ({"image_id": 2, "category_id": 3, "bbox": [50, 30, 20, 20], "score": "0.8"}, "score '0.8' is not a number"),
    ({"image_id": 2, "category_id": 3, "bbox": [50, 30, 20, 20], "score": float("inf")}, "not finite"),
    ({"image_id": 7, "category_id": 3, "bbox": [50, 30, 20, 20], "score": 0.8}, "image_id 7"),
    ({"image_id": 2, "category_id": 4, "bbox": [50, 30, 20, 20], "score": 0.8}, "category_id 4"),
    ({"image_id": 2, "category_id": 3, "bbox": [50, 30, True, 20], "score": 0.8}, "4 numbers"),
], ids=["nan_box", "negative_width", "string_score", "inf_score", "unknown_image", "unknown_category", "bool"])
def test_results_file_with_a_bad_entry_is_refused(tmp_path, capsys, bad, words):
    gt = _annotations(tmp_path)
    res = tmp_path / "res.json"
    res.write_text(json.dumps([GOOD, bad, dict(bad)]))  # json writes NaN/Infinity, as a careless writer would
    out = tmp_path / "out"
    assert _tool("evaluate").main(["--results", str(res), "--annotations", gt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "res.json" in err and "2 of 3 entries" in err and "entry 1:" in err and "entry 2:" in err
    assert words in err
    assert not (out / "metrics.json").exists()  # nothing scored, nothing written


def test_results_file_names_the_first_bad_entries_and_counts_the_rest(tmp_path, capsys):
    gt = _annotations(tmp_path)
    res = tmp_path / "res.json"
    bad = dict(GOOD, bbox=[1, 1, 0, 5])
    res.write_text(json.dumps([GOOD] + [bad] * 9))
    assert _tool("evaluate").main(["--results", str(res), "--annotations", gt, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "9 of 10 entries" in err and "entry 5:" in err and "entry 6:" not in err and "(and 4 more)" in err
    # The good entries alone still score (the check refuses nothing valid).
    res.write_text(json.dumps([GOOD, dict(GOOD, image_id=2, bbox=[50, 30, 20, 20])]))
    assert _tool("evaluate").main(["--results", str(res), "--annotations", gt, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "metrics.json", encoding="utf-8") as f:
        assert json.load(f)["AP"] == pytest.approx(1.0)
