"""The four tools end to end on the Keras backend of the environment (KERAS_BACKEND), with TensorFlow hidden:
``import tensorflow`` fails here, as on a machine where it is not installed. Used by tests/test_backend_tools.py.

usage: python backend_tools_worker.py WORKDIR

In WORKDIR (the current directory, where the shapes data is generated): train two epochs (validation, checkpoints,
TensorBoard logs, the progress bar), train again with a third epoch (resumes), infer on two validation images,
evaluate the validation split; then the NaN guard on a tiny model. Prints ``RESULT <json>`` last.
"""

import contextlib
import io
import json
import os
import sys
import time

sys.modules["tensorflow"] = None  # "import tensorflow" fails, as where it is not installed

import numpy as np  # noqa: E402

from frcnn.cli import evaluate, infer, train  # noqa: E402

SETTINGS = ["--config", "test.yaml", "--set", "data.synthetic.num_train=4", "--set", "data.synthetic.num_val=2",
            "--set", "train.steps_per_epoch=2", "--set", "train.checkpoint_every=0",
            "--set", "roi_heads.score_thresh=0.0"]


def _run(tool, argv):
    """``tool.main(argv)``: its exit code, seconds and what it printed."""
    out = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out):
        code = tool.main(argv)
    return code, round(time.monotonic() - start, 1), out.getvalue()


def main(workdir):
    import keras

    os.chdir(workdir)
    result = {"backend": keras.backend.backend()}
    run = os.path.join(workdir, "run")
    code, seconds, printed = _run(train, SETTINGS + ["--workdir", run, "--set", "train.epochs=2"])
    state = json.load(open(os.path.join(run, "checkpoints", "state.json")))
    result["train"] = {"code": code, "seconds": seconds, "state": state,
                       "validated": "val AP" in printed, "progress_bar": "2/2" in printed,
                       "events": sorted(os.listdir(os.path.join(run, "logs"))),
                       "files": sorted(os.listdir(run))}
    code, seconds, printed = _run(train, SETTINGS + ["--workdir", run, "--set", "train.epochs=3"])
    state = json.load(open(os.path.join(run, "checkpoints", "state.json")))
    result["resume"] = {"code": code, "seconds": seconds, "state": state,
                        "resumed": "resuming from" in printed and "global step 4" in printed}
    with open("data/shapes_test/ImageSets/Main/val.txt", encoding="utf-8") as f:
        images = [os.path.join("data/shapes_test/JPEGImages", line.strip() + ".jpg") for line in f if line.strip()]
    weights = os.path.join(run, "checkpoints", "last.weights.h5")
    code, seconds, _ = _run(infer, images + ["--weights", weights, "--out", os.path.join(workdir, "infer"),
                                             "--score-thresh", "0.0"])
    detections = json.load(open(os.path.join(workdir, "infer", "detections.json")))
    result["infer"] = {"code": code, "seconds": seconds, "images": len(detections["images"]),
                       "boxes": [len(image["boxes"]) for image in detections["images"]]}
    code, seconds, _ = _run(evaluate, ["--weights", weights, "--out", os.path.join(workdir, "eval")])
    metrics = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
    result["evaluate"] = {"code": code, "seconds": seconds, "num_images": metrics.get("num_images"),
                          "AP": metrics.get("AP")}
    result["nan_guard"] = _nan_guard(os.path.join(workdir, "nan"))
    result["tensorflow_loaded"] = [m for m, v in sys.modules.items() if m.split(".")[0] == "tensorflow" and v]
    print("RESULT " + json.dumps(result))


def _nan_guard(ckpt):
    """A NaN in the data stops training with the step named; the checkpoint on disk is the last good one."""
    import keras

    from frcnn import callbacks, checkpoints, engine
    from frcnn.errors import TrainingError

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    x = np.ones((16, 1, 3), np.float32)
    x[9] = np.nan  # the batch of step 10

    def batches():  # one sample per step, endlessly, as the pipelines give batches
        while True:
            for sample in x:
                yield sample, sample.sum(1, keepdims=True)

    stop = callbacks.StopOnNonFinite()
    manager = checkpoints.CheckpointManager(ckpt, steps_per_epoch=4)
    try:
        engine.fit_resumable(model, batches(), 4, 4, [stop, manager], manager, stop, verbose=0)
    except TrainingError as err:
        state = checkpoints.read_state(ckpt)
        return {"stopped": "global step 10" in str(err), "checkpoint_step": state and state["global_step"]}
    return {"stopped": False}


if __name__ == "__main__":
    main(sys.argv[1])
