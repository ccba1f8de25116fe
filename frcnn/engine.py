"""The jobs the tools run: training with ``fit``, detection over a dataset split, evaluation.

``tools/train.py`` and ``tools/evaluate.py`` only parse arguments and call :func:`train` and :func:`evaluate_split`.
"""

import dataclasses
import json
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from frcnn import data as data_lib
from frcnn import evaluation
from frcnn import training
from frcnn.config import save_config
from frcnn.model import build_model
from frcnn.visualize import draw_detections, save_image

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ detection, evaluation


def detect_records(model, cfg, records, max_images=None, verbose=1):
    """Run the detector over dataset records: one dict per image with ``image_id`` and original-pixel ``boxes``,
    ``scores``, ``classes``. Images the pipeline could not decode are missing from the result (and logged)."""
    records = list(records)[:max_images] if max_images else list(records)
    if not records:
        return []
    dataset = data_lib.build_dataset(cfg, records, training=False, batch_size=cfg.eval.batch_size)
    by_id = {r.image_id: r for r in records}
    progress = keras.utils.Progbar(len(records), verbose=verbose, unit_name="image")
    detections = []
    for batch in dataset:
        out = model.predict_on_batch(batch)
        for j in range(len(out["num_detections"])):
            n = int(out["num_detections"][j])
            image_id = int(out["image_ids"][j])
            w, h = by_id[image_id].width, by_id[image_id].height
            detections.append({
                "image_id": image_id,
                "boxes": np.minimum(np.asarray(out["boxes"][j, :n], np.float32), [w, h, w, h]),
                "scores": np.asarray(out["scores"][j, :n], np.float32),
                "classes": np.asarray(out["classes"][j, :n], np.int32),
            })
        progress.add(len(out["num_detections"]))
    return detections


def evaluate_records(model, cfg, records, class_names, category_ids=None, max_images=None, verbose=1):
    """COCO-style (pycocotools) and VOC07 metrics of ``model`` on ``records``; returns (metrics, detections)."""
    records = list(records)[:max_images] if max_images else list(records)
    detections = detect_records(model, cfg, records, verbose=verbose)
    seen = {d["image_id"] for d in detections}
    evaluated = [r for r in records if r.image_id in seen]
    if len(evaluated) < len(records):
        log.warning("%d of %d images could not be read and are left out of the evaluation",
                    len(records) - len(evaluated), len(records))
    metrics = evaluation.evaluate(evaluated, detections, class_names, category_ids=category_ids)
    return metrics, detections


class EvaluationCallback(keras.callbacks.Callback):
    """Evaluates on the validation split every ``every`` epochs and adds ``val_AP``, ``val_AP50``, ``val_AP75`` and
    ``val_voc07_mAP50`` to the epoch logs, where TensorBoard and the best-checkpoint choice read them.

    Place it before :class:`frcnn.training.CheckpointManager` and ``TensorBoard`` in the callback list.
    """

    def __init__(self, cfg, records, class_names, category_ids=None, every=1, max_images=None):
        super().__init__()
        self.cfg = cfg
        self.records = records
        self.class_names = class_names
        self.category_ids = category_ids
        self.every = every
        self.max_images = max_images
        self.last_metrics = None

    def on_epoch_end(self, epoch, logs=None):
        last = epoch + 1 == self.params.get("epochs")
        if logs is None or not self.every or ((epoch + 1) % self.every and not last):
            return
        metrics, _ = evaluate_records(self.model, self.cfg, self.records, self.class_names, self.category_ids,
                                      self.max_images, verbose=0)
        self.last_metrics = metrics
        for key in ("AP", "AP50", "AP75", "voc07_mAP50"):
            value = metrics.get(key)
            logs[f"val_{key}"] = float(value) if value is not None and value >= 0 else 0.0
        print(f"\nepoch {epoch + 1}: val AP {logs['val_AP']:.4f}  AP50 {logs['val_AP50']:.4f}  "
              f"VOC07 mAP50 {logs['val_voc07_mAP50']:.4f}")


# ------------------------------------------------------------------------------------------------------ training


def _log_data(name, records, class_names, report):
    text = data_lib.summary(records, class_names, report)
    print(f"{name}:\n{text}")


def train(cfg, workdir, verbose=1):
    """Train the detector described by ``cfg`` in ``workdir`` (resuming from its last checkpoint if there is one).

    Returns ``(model, result)`` where ``result`` has the final validation metrics (or None), the history and the
    path of an annotated prediction image.
    """
    keras.utils.set_random_seed(cfg.train.seed)
    strategy = training.make_strategy(cfg.train.strategy)
    chief = training.is_chief(strategy)

    train_records, class_names, train_report = data_lib.load_records(cfg, cfg.data.train_split)
    if cfg.data.classes is None:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, classes=tuple(class_names)))
    _log_data(f"training split '{cfg.data.train_split}'", train_records, class_names, train_report)
    if not train_records:
        raise training.TrainingError(f"the training split '{cfg.data.train_split}' has no usable images")
    val_records, val_report = None, None
    if cfg.data.val_split:
        val_records, _, val_report = data_lib.load_records(cfg, cfg.data.val_split)
        _log_data(f"validation split '{cfg.data.val_split}'", val_records, class_names, val_report)

    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if chief:
        save_config(cfg, os.path.join(workdir, "config.yaml"))
    state = training.read_state(checkpoint_dir)
    steps = training.steps_per_epoch(cfg, len(train_records))
    if state and state.get("steps_per_epoch") not in (None, steps):
        raise training.TrainingError(
            f"{checkpoint_dir}: the checkpoint was made with {state['steps_per_epoch']} steps per epoch, this run "
            f"has {steps}; resume with the same data and train.batch_size/steps_per_epoch, or use a new --workdir"
        )

    with strategy.scope():
        model = build_model(cfg, load_weights=state is None)
        model.compile(optimizer=training.make_optimizer(cfg, steps), jit_compile=cfg.train.jit_compile)
        if state is not None:
            training.load_checkpoint(model, os.path.join(checkpoint_dir, training.LAST_WEIGHTS), with_optimizer=True)
            print(f"resuming from {checkpoint_dir}: epoch {state['epoch']}, global step {state['global_step']}")

    dataset = data_lib.build_dataset(cfg, train_records, training=True, batch_size=cfg.train.batch_size)
    category_ids = getattr(val_records, "category_ids", None)
    stop_on_nan = training.StopOnNonFiniteLoss()
    callbacks = [stop_on_nan]
    evaluator = None
    if val_records and cfg.train.val_every:
        evaluator = EvaluationCallback(cfg, val_records, class_names, category_ids, cfg.train.val_every,
                                       cfg.train.val_max_images)
        callbacks.append(evaluator)
    manager = training.CheckpointManager(
        checkpoint_dir, steps, every_steps=cfg.train.checkpoint_every, monitor="val_AP",
        best=state.get("best") if state else None, chief=chief,
    )
    callbacks.append(manager)
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(workdir, "logs"), write_graph=False))

    start_step = int(state["global_step"]) if state else 0
    epoch, step_in_epoch = divmod(start_step, steps)
    histories = []
    try:
        if step_in_epoch and epoch < cfg.train.epochs:
            # Finish the interrupted epoch first: fit cannot start in the middle of an epoch.
            histories.append(model.fit(dataset, initial_epoch=epoch, epochs=epoch + 1,
                                       steps_per_epoch=steps - step_in_epoch, callbacks=callbacks, verbose=verbose))
            epoch += 1
        if epoch < cfg.train.epochs and not stop_on_nan.message:
            histories.append(model.fit(dataset, initial_epoch=epoch, epochs=cfg.train.epochs, steps_per_epoch=steps,
                                       callbacks=callbacks, verbose=verbose))
    except KeyboardInterrupt:
        manager.save("interrupted")
        print(f"\ninterrupted: checkpoint saved in {checkpoint_dir}; run the same command again to resume")
        raise
    if stop_on_nan.message:
        raise training.TrainingError(stop_on_nan.message)

    result = {"history": {k: v for h in histories for k, v in h.history.items()}, "metrics": None,
              "prediction_image": None}
    if val_records:
        metrics = evaluator.last_metrics if evaluator and evaluator.last_metrics else None
        if metrics is None:
            metrics, _ = evaluate_records(model, cfg, val_records, class_names, category_ids,
                                          cfg.train.val_max_images, verbose=verbose)
        result["metrics"] = metrics
        if chief:
            evaluation.save_json(metrics, os.path.join(workdir, "val_metrics.json"))
            result["prediction_image"] = _annotate_example(model, val_records, workdir)
    return model, result


def _annotate_example(model, records, workdir):
    """Draw the detections on the first readable validation image; returns the written path (or None)."""
    for record in records:
        try:
            image = data_lib.load_image(record.file_name)
        except data_lib.DataError:
            continue
        det = model.detect([image])[0]
        drawn = draw_detections(image, det["boxes"], det["scores"], det["classes"], model.class_names)
        return save_image(os.path.join(workdir, "prediction.jpg"), drawn)
    return None


def print_metrics(metrics, class_names):
    print(evaluation.format_report(metrics, class_names))


def dump_history(result, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump({k: [float(x) for x in v] for k, v in result["history"].items()}, f, indent=2)


# ------------------------------------------------------------------------------ evaluation files (tools/evaluate.py)


def _coco_category_ids(category_ids, num_classes):
    """The dataset's category id of each class, or None (ids 1..C-1). A class absent from a COCO file's
    categories (its id is None) gets a fresh id above the others, so that results can still be written."""
    if category_ids is None:
        return None
    ids = list(category_ids)
    if len(ids) != num_classes:
        raise ValueError(f"category_ids has {len(ids)} entries for {num_classes} classes")
    fresh = max([int(i) for i in ids if i is not None], default=0)
    for k, cid in enumerate(ids):
        if cid is None:
            fresh += 1
            ids[k] = fresh
    return [int(i) for i in ids]


def evaluate_split(model, cfg, split, out_dir=None, max_images=None, verbose=1):
    """COCO-style (pycocotools) and VOC07 evaluation of ``model`` on ``split`` of the dataset ``cfg`` describes.

    Returns ``(metrics, files)``. With ``out_dir``, writes there (``files`` maps each kind to its path):
    - ``metrics.json``: :func:`frcnn.evaluation.evaluate`'s dict (the 12 COCOeval numbers, per-class AP and AP50,
      VOC07 per-class AP50 and their mean, counts) plus ``split``, ``format`` and the two file names below;
    - ``results.json``: the detections as a standard COCO results list (``image_id``, ``category_id``,
      ``bbox = [x, y, w, h]`` in original pixels, ``score``), with the dataset's own category ids (COCO) and, for
      COCO data, the dataset's image ids (``Record.source_id``), so the file can be scored against the original
      annotation file; for VOC and shapes data ``image_id`` is the record's index in the split;
    - ``gt.json``: the ground truth exactly as evaluated (the images read, difficult / crowd boxes as
      ``iscrowd``), as a COCO annotation file with the same ids: ``tools/evaluate.py --results results.json
      --annotations gt.json`` reproduces these numbers.
    """
    records, class_names, report = data_lib.load_records(cfg, split)
    if cfg.data.classes is not None and tuple(class_names) != tuple(cfg.data.classes):
        raise data_lib.DataError(f"split '{split}' has the classes {list(class_names)}, the model "
                                 f"{list(cfg.data.classes)}")
    if not records:
        raise data_lib.DataError(f"split '{split}' of {cfg.data.root} has no usable images"
                                 + (f" ({len(report.skipped)} skipped)" if report.skipped else ""))
    fmt = getattr(records, "format", None)
    category_ids = _coco_category_ids(getattr(records, "category_ids", None), len(class_names))
    metrics, detections = evaluate_records(model, cfg, records, class_names, category_ids, max_images, verbose)
    metrics["split"] = split
    metrics["format"] = fmt
    files = {}
    if out_dir:
        by_id = {r.image_id: r for r in records}
        # COCO data keeps the dataset's image ids (results then also score against the official annotations).
        use_source = fmt == "coco" and all(isinstance(by_id[d["image_id"]].source_id, (int, np.integer))
                                           for d in detections)

        def out_id(image_id):
            return int(by_id[image_id].source_id) if use_source else int(image_id)

        evaluated = [by_id[d["image_id"]] for d in detections]
        gt = evaluation.to_coco_ground_truth(
            [{"image_id": out_id(r.image_id), "width": r.width, "height": r.height, "boxes": r.boxes,
              "classes": r.classes, "ignore": r.ignore} for r in evaluated],
            class_names, category_ids,
        ).dataset
        for image, record in zip(gt["images"], evaluated):  # same order: one image per record
            image["file_name"] = os.path.basename(record.file_name)
        results = evaluation.detections_to_coco_results(
            [dict(d, image_id=out_id(d["image_id"])) for d in detections], category_ids)
        files = {k: os.path.join(out_dir, k + ".json") for k in ("metrics", "results", "gt")}
        metrics["results_file"] = os.path.abspath(files["results"])
        metrics["gt_file"] = os.path.abspath(files["gt"])
        evaluation.save_json(results, files["results"])
        evaluation.save_json(gt, files["gt"])
        evaluation.save_json(metrics, files["metrics"])
    return metrics, files


def _read_json_file(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what} file '{path}' does not exist") from None
    except OSError as err:
        raise ValueError(f"{what} file '{path}' cannot be read ({err.strerror or err})") from None
    except ValueError as err:
        raise ValueError(f"{what} file '{path}' is not valid JSON ({err})") from None


def _check_results(results, path, coco_gt):
    if not isinstance(results, list):
        raise ValueError(f"results file '{path}' must hold a JSON list of detections (COCO results format), "
                         f"got {type(results).__name__}")
    categories = set(coco_gt.getCatIds())
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(r):
            raise ValueError(f"results file '{path}': entry {i} is not a detection with image_id, category_id, "
                             f"bbox and score: {str(r)[:200]}")
        bbox = r["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"results file '{path}': entry {i} has bbox {bbox!r}, expected [x, y, w, h]")
        if r["category_id"] not in categories:
            raise ValueError(f"results file '{path}': entry {i} has category_id {r['category_id']}, which is not "
                             f"among the annotation file's categories {sorted(categories)}")


def score_results_file(results_path, annotations_path):
    """Score a COCO results file against a COCO annotation file (no model): ``(metrics, class_names)``.

    ``metrics`` has the same keys as :func:`frcnn.evaluation.evaluate`: the 12 COCOeval numbers and per-class AP
    (pycocotools), and the VOC07 11-point AP50 per class and its mean computed on the same boxes (``iscrowd``
    annotations are ignore regions, as VOC difficult boxes). Classes are the annotation file's categories in
    increasing id order. Raises ``ValueError`` naming the file for unreadable or malformed input.
    """
    import contextlib
    import io

    from pycocotools.coco import COCO

    data = _read_json_file(annotations_path, "annotation")
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise ValueError(f"annotation file '{annotations_path}' is not a COCO annotation file (it needs 'images', "
                         "'annotations' and 'categories')")
    coco_gt = COCO()
    coco_gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    results = _read_json_file(results_path, "results")
    _check_results(results, results_path, coco_gt)
    try:
        metrics = evaluation.coco_evaluate(coco_gt, results)
    except ValueError as err:
        raise ValueError(f"{results_path}: {err} (annotations: {annotations_path})") from None

    cat_ids = sorted(coco_gt.getCatIds())
    class_names = [str(coco_gt.cats[c]["name"]) for c in cat_ids]
    class_of = {c: k for k, c in enumerate(cat_ids, start=1)}
    records = []
    for image in data["images"]:
        anns = coco_gt.imgToAnns.get(image["id"], [])
        boxes = np.asarray([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # [x, y, w, h] -> [x1, y1, x2, y2]
        records.append({"image_id": image["id"], "width": image.get("width", 0), "height": image.get("height", 0),
                        "boxes": boxes, "classes": [class_of[a["category_id"]] for a in anns],
                        "ignore": [bool(a.get("iscrowd", 0)) for a in anns]})
    per_image = {r["image_id"]: {"image_id": r["image_id"], "boxes": [], "scores": [], "classes": []}
                 for r in records}
    for r in results:
        x, y, w, h = r["bbox"]
        det = per_image[r["image_id"]]
        det["boxes"].append([x, y, x + w, y + h])
        det["scores"].append(r["score"])
        det["classes"].append(class_of[r["category_id"]])
    voc = evaluation.voc_evaluate(records, list(per_image.values()), class_names)
    metrics["voc07_mAP50"] = voc["mAP50"]
    metrics["voc07_per_class_AP50"] = voc["per_class_AP50"]
    metrics["num_images"] = len(records)
    metrics["num_detections"] = len(results)
    return metrics, class_names
