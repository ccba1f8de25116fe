"""The command-line tools and what they share.

The tools are the modules of this package, each with ``main(argv=None)`` returning the exit code:
:mod:`frcnn.cli.train`, :mod:`~frcnn.cli.infer`, :mod:`~frcnn.cli.evaluate` and :mod:`~frcnn.cli.export`. An
installed package runs them as the commands ``frcnn-train``, ``frcnn-infer``, ``frcnn-evaluate`` and
``frcnn-export`` (``[project.scripts]`` in pyproject.toml); ``tools/*.py`` in the repository are the same ``main``
as scripts.

What they share:

- :func:`make_parser` and the common flags: :func:`add_config` (``--config``), :func:`add_overrides` (``--set
  key=value``, repeatable), :func:`add_weights` (``--weights``);
- :func:`setup_logging`: one format for every tool, chatty libraries held at WARNING;
- :func:`run`: the exit codes. A problem the user can fix (:class:`ConfigError`, :class:`DataError`,
  :class:`TrainingError`, and whatever else the tool names, e.g. ``OSError`` for an output folder) prints
  ``error: <message>`` on stderr and gives 2; Ctrl-C gives 130 (128 + SIGINT), and a SIGTERM that training turned
  into a checkpoint and a clean stop (``frcnn.engine.Interrupted``) 143 (128 + SIGTERM), without a traceback.
  Anything else is a bug and keeps its traceback.

Importing this package sets ``TF_CPP_MIN_LOG_LEVEL=2`` (unless it is set already) before anything here can import
TensorFlow: ``import frcnn`` imports neither Keras nor TensorFlow, so the line below runs first.
"""

import argparse
import logging
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported: its C++ start-up chatter

from frcnn.config import ConfigError  # noqa: E402
from frcnn.data import DataError  # noqa: E402
from frcnn.errors import TrainingError  # noqa: E402

USER_ERRORS = (ConfigError, DataError, TrainingError)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

WEIGHTS_HELP = ("checkpoint, e.g. runs/shapes/checkpoints/best.weights.h5, a Detectron2 model_final_*.pkl or "
                "detectron2:<zoo name> (see README)")


def make_parser(doc):
    """An ``ArgumentParser`` whose ``--help`` shows the tool's module docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config(parser, default=None, help_text="config name or path (default: the config.yaml saved with the weights)"):
    parser.add_argument("--config", default=default, help=help_text)


def add_overrides(parser, example):
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``; ``example`` is shown in the help."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example} (repeatable)")


def add_weights(parser, required=True, help_text=WEIGHTS_HELP):
    parser.add_argument("--weights", required=required, help=help_text)


# Held at WARNING in every tool: JAX logs at INFO each platform it cannot start ("Unable to initialize backend
# 'tpu'") the first time it picks a device.
ALWAYS_QUIET = ("jax._src.xla_bridge",)


def setup_logging(quiet=()):
    """INFO logs as ``LEVEL logger: message``; the loggers in :data:`ALWAYS_QUIET` and ``quiet`` only from WARNING
    up."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ALWAYS_QUIET + tuple(quiet):
        logging.getLogger(name).setLevel(logging.WARNING)


def error(message):
    """Print ``error: message`` on stderr; returns the exit code of an error (2)."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def run(body, also=()):
    """``body()``'s exit code; 2 with the message for :data:`USER_ERRORS` and the exception types in ``also``, 130
    on Ctrl-C (128 + the signal's number when the interruption carries one, e.g. 143 for SIGTERM)."""
    try:
        return body()
    except KeyboardInterrupt as err:
        return 128 + int(getattr(err, "signum", signal.SIGINT))  # 130 (EXIT_INTERRUPTED) for Ctrl-C
    except USER_ERRORS + tuple(also) as err:
        return error(err)
