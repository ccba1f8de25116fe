"""Detect objects in images with a trained model: ``python tools/infer.py --help``.

The code is :mod:`frcnn.cli.infer` (installed as the ``frcnn-infer`` command); this script runs it from a checkout
where frcnn is installed (``pip install -e .``, which ``pip install -r requirements.txt`` does).
"""

import sys

try:
    from frcnn.cli.infer import main
except ModuleNotFoundError as err:  # a checkout without the package installed
    if err.name != "frcnn":
        raise
    print("error: the frcnn package is not installed in this Python: run `pip install -r requirements.txt` (or "
          "`pip install -e .`) in the repository root", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
