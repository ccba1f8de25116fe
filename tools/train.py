"""Train Faster R-CNN: ``python tools/train.py --help``.

The code is :mod:`frcnn.cli.train` (installed as the ``frcnn-train`` command); this script runs it from a checkout
where frcnn is installed (``pip install -e .``, which ``pip install -r requirements.txt`` does).
"""

import sys

try:
    from frcnn.cli.train import main
except ModuleNotFoundError as err:  # a checkout without the package installed
    if err.name != "frcnn":
        raise
    print("error: the frcnn package is not installed in this Python: run `pip install -r requirements.txt` (or "
          "`pip install -e .`) in the repository root", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
