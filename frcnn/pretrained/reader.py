"""Reading a Detectron2 or Caffe2 checkpoint: a Detectron2 model-zoo ``.pkl`` (``{"model": {name: ndarray},
"__author__": ...}``) or MSRA's ``R-50.pkl`` (Caffe2 blobs: ``{name: ndarray}``, or ``{"blobs": {...}}`` for
Detectron 1 files), read the way Detectron2's ``DetectionCheckpointer._load_file`` reads them
(``checkpoint/detection_checkpoint.py``: ``*_momentum`` blobs dropped) and renamed to Detectron2's names
(``checkpoint/c2_model_loading.py``: ``res2_0_branch2a_bn_s`` -> ``backbone.res2.0.conv1.norm.weight``).

Keys that a checkpoint may hold without use (``pixel_mean``, ``pixel_std``, cached cell anchors,
``num_batches_tracked``; in ``R-50.pkl`` the ImageNet classifier ``fc1000_*`` and ``conv1_b``, which Detectron2 also
leaves unused because its stem has no bias) are set aside as ``ignored``.

A pickle is a program: ``pickle.load`` calls whatever functions the file names (``os.system`` included). So the
files are read by :class:`SafeUnpickler`, which admits only what these checkpoints hold (dicts, lists, tuples,
strings, numbers, NumPy arrays and scalars) and refuses anything else before it runs, naming the file and the
object. See its docstring for the allow-list and the memory bound.

Owns: the file formats. Imports no model code and no backend.
"""

import collections
import dataclasses
import math
import os
import pickle
import re

import numpy as np

from frcnn.pretrained.registry import PretrainedError

# -------------------------------------------------------------------------------------------- a safe unpickler

_NUMERIC_KINDS = "biufc"  # bool, signed / unsigned integers, floats, complex


class UnsafePickleError(PretrainedError):
    """A ``.pkl`` file asks for something a checkpoint never holds (a function to call, an object array, an array
    larger than the file); it was refused before anything ran or was allocated."""


class _NdarrayToken:
    """What the name ``numpy.ndarray`` resolves to: only :func:`_reconstruct` takes it (as NumPy's own pickles
    pass it); calling it (``ndarray(shape)`` would allocate any size) is refused."""

    def __init__(self, unpickler):
        self._unpickler = unpickler

    def __call__(self, *args, **kwargs):
        raise self._unpickler.refuse("numpy.ndarray called directly (NumPy's pickles only pass it to _reconstruct)")


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that rebuilds only what Detectron2 and Caffe2 checkpoints contain.

    Containers and scalars (dict, list, tuple, str, bytes, int, float, bool, None) come from pickle's own opcodes
    and need no global. The globals a file may name are exactly those NumPy's pickling writes (NumPy 1.x under
    ``numpy.core``, 2.x under ``numpy._core``), each replaced by a checking version, plus three from Python itself:

    - ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``: the empty array that
      ``ndarray.__reduce__`` starts from, then filled by ``__setstate__`` (``(version, shape, dtype, fortran,
      data)``), where the dtype must be numeric, the data bytes must match the shape, and the size must fit in
      what is left of the file;
    - ``numpy.ndarray`` (only as ``_reconstruct``'s argument) and ``numpy.dtype`` (built from its type string only);
    - ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar``: a NumPy scalar from its bytes;
    - ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer``: arrays of protocol-5 pickles;
    - ``_codecs.encode`` (latin-1 only) and ``bytes()`` (without an argument): how Python 3 writes ``bytes`` (the
      data of an array) at protocols 0 to 2;
    - ``collections.OrderedDict``: the dict type of PyTorch-style state dicts.

    Python 2 files (Caffe2's ``R-50.pkl``, protocol 2) are read with ``encoding="latin1"``, so their byte strings,
    array data included, arrive as ``str`` of one character per byte, as NumPy expects.

    Anything else is refused with :class:`UnsafePickleError` naming the file and the object, before it is called.
    Memory: the arrays' declared sizes together may not exceed the file's size (each array's bytes are stored in the
    file), so a small file cannot make the reader allocate gigabytes; a bigger declaration is refused before any
    allocation.
    """

    def __init__(self, file, path, size):
        super().__init__(file, encoding="latin1")
        self.path = path
        self.budget = int(size)
        self._ndarray = _NdarrayToken(self)
        reader = self

        class _PickledArray(np.ndarray):
            # The array _reconstruct returns: its __setstate__ checks the state before NumPy's fills it.
            def __setstate__(self, state):
                np.ndarray.__setstate__(self, reader._check_array_state(state))

        self._array_type = _PickledArray
        self._globals = {
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy.core.multiarray", "scalar"): self._scalar,
            ("numpy._core.multiarray", "scalar"): self._scalar,
            ("numpy.core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy", "ndarray"): self._ndarray,
            ("numpy", "dtype"): self._dtype,
            ("_codecs", "encode"): self._encode,
            ("__builtin__", "bytes"): self._empty_bytes,
            ("builtins", "bytes"): self._empty_bytes,
            ("collections", "OrderedDict"): collections.OrderedDict,
        }

    # ------------------------------------------------------------------------------------------- refusals

    def refuse(self, what, size=False):
        if size:
            tail = "Nothing was allocated; is the file a genuine checkpoint?"
        else:
            tail = ("A Detectron2 or Caffe2 checkpoint holds only dicts, lists, strings, numbers and NumPy arrays; a "
                    "pickle that asks for anything else may run code when it is read, so nothing in it was run. Use "
                    "the original file from the model zoo")
        return UnsafePickleError(f"'{self.path}' is refused: {what}. {tail}")

    def find_class(self, module, name):
        found = self._globals.get((module, name))
        if found is None:
            hint = " (a PyTorch file: convert its tensors to NumPy arrays first)" if module.startswith("torch") \
                else ""
            raise self.refuse(f"it contains the object {module}.{name}{hint}")
        return found

    def persistent_load(self, pid):
        raise self.refuse(f"it refers to an external object (persistent id {str(pid)[:40]!r})")

    # --------------------------------------------------------------------------------------------- checks

    def _numeric(self, dtype, what):
        if not isinstance(dtype, np.dtype):
            raise self.refuse(f"{what} has no NumPy dtype ({type(dtype).__name__})")
        if dtype.kind not in _NUMERIC_KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype:
            raise self.refuse(f"{what} has the dtype {dtype}, not a number type")
        return dtype

    def _shape(self, shape, what):
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if not (isinstance(shape, tuple) and len(shape) <= 32
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise self.refuse(f"{what} has the shape {str(shape)[:80]}, not a tuple of sizes")
        return shape

    def _charge(self, shape, dtype, what):
        """Refuse an array whose declared size exceeds what is left of the file; else count it."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.budget:
            raise self.refuse(
                f"{what} declares {nbytes} bytes (shape {shape}, {dtype}) but the file holds only "
                f"{self.budget} more bytes (a NumPy array stores its data in the file)", size=True)
        self.budget -= nbytes
        return nbytes

    @staticmethod
    def _length(data):
        """Bytes in ``data`` (``bytes``, ``bytearray``, or a Python 2 byte string read as latin-1 ``str``: one
        character per byte), counted without copying; None for anything else."""
        return len(data) if isinstance(data, (bytes, bytearray, str)) else None

    # ------------------------------------------------------------------------------ the admitted globals

    def _reconstruct(self, subtype, shape, typecode):
        if subtype is not self._ndarray:
            raise self.refuse(f"numpy _reconstruct asked for the type {type(subtype).__name__}, not numpy.ndarray")
        if not isinstance(typecode, (str, bytes)):
            raise self.refuse("numpy _reconstruct got a type code that is not a string")
        code = typecode.decode("latin1") if isinstance(typecode, bytes) else typecode
        dtype = self._numeric(self._dtype(code), "an array")
        shape = self._shape(shape, "an array")
        self._charge(shape, dtype, "an array")  # NumPy's own pickles ask for (0,): nothing
        return np.ndarray.__new__(self._array_type, shape, dtype)

    def _check_array_state(self, state):
        """``ndarray.__setstate__``'s argument, checked: numeric dtype, data bytes matching the shape, in budget."""
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise self.refuse("an array has a malformed state")
        shape, dtype, _, data = state[-4:]
        shape = self._shape(shape, "an array")
        self._numeric(dtype, "an array")
        nbytes = self._charge(shape, dtype, "an array")
        length = self._length(data)
        if length != nbytes:
            got = f"{length} bytes" if length is not None else type(data).__name__
            raise self.refuse(f"an array of shape {shape} ({dtype}) needs {nbytes} bytes of data, the file has {got}")
        return state

    def _dtype(self, obj, align=False, copy=False):
        if not isinstance(obj, str) or len(obj) > 16:
            raise self.refuse(f"numpy.dtype asked for {str(obj)[:40]!r}, not a type string")
        try:
            return np.dtype(obj, bool(align), bool(copy))
        except (TypeError, ValueError):
            raise self.refuse(f"numpy.dtype asked for the unknown type {obj!r}") from None

    def _scalar(self, dtype, data=None):
        self._numeric(dtype, "a NumPy scalar")
        if self._length(data) != dtype.itemsize:
            raise self.refuse(f"a NumPy scalar of dtype {dtype} has malformed data")
        return np.frombuffer(data.encode("latin1") if isinstance(data, str) else data, dtype)[0].copy()

    def _frombuffer(self, buf, dtype, shape, order="C", axis_order=None):
        self._numeric(dtype, "an array")
        shape = self._shape(shape, "an array")
        nbytes = self._charge(shape, dtype, "an array")
        if self._length(buf) != nbytes or order not in ("C", "F", "K"):
            raise self.refuse(f"an array of shape {shape} ({dtype}) has malformed data")
        # A writable array, as NumPy's own _frombuffer gives for the bytearray a protocol-5 pickle holds.
        array = np.frombuffer(buf if isinstance(buf, bytearray) else bytearray(
            buf.encode("latin1") if isinstance(buf, str) else buf), dtype)
        if order == "K" and axis_order is not None:
            if sorted(axis_order) != list(range(len(shape))):
                raise self.refuse("an array has a malformed axis order")
            return array.reshape(shape, order="C").transpose(axis_order)
        return array.reshape(shape, order=order if order != "K" else "C")

    def _empty_bytes(self, *args):
        if args:  # bytes(n) would allocate n bytes
            raise self.refuse("bytes() was called with an argument")
        return b""

    def _encode(self, text, encoding="utf-8"):
        if not isinstance(text, str) or str(encoding).lower().replace("-", "") != "latin1":
            raise self.refuse("_codecs.encode was asked for something other than latin-1 bytes")
        return text.encode("latin1")


def _plain(value, array_type):
    """The loaded object with the checked array type turned back into plain ``np.ndarray`` (a view, no copy)."""
    if isinstance(value, array_type):
        return value.view(np.ndarray)
    if isinstance(value, dict):
        return type(value)((k, _plain(v, array_type)) for k, v in value.items())
    if isinstance(value, list):
        return [_plain(v, array_type) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, array_type) for v in value)
    return value


def safe_load(path):
    """Read a ``.pkl`` file with :class:`SafeUnpickler`; :class:`UnsafePickleError` for anything outside its
    allow-list, :class:`PretrainedError` naming the file for a damaged one."""
    try:
        with open(path, "rb") as f:
            unpickler = SafeUnpickler(f, path, os.fstat(f.fileno()).st_size)
            return _plain(unpickler.load(), unpickler._array_type)
    except PretrainedError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, MemoryError, RecursionError, OverflowError) as err:
        raise PretrainedError(f"'{path}' is not a readable Detectron2 pickle ({type(err).__name__}: "
                              f"{str(err)[:200]}); is it complete?") from None


# --------------------------------------------------------------------------------------------- reading a file


@dataclasses.dataclass
class Checkpoint:
    """Tensors of a Detectron2 or Caffe2 file under Detectron2's names. ``origin`` maps a name to the file's own
    name (they differ for Caffe2 files), ``ignored`` lists keys expected to be unused, ``extra`` the others."""

    path: str
    format: str  # "detectron2" | "caffe2"
    tensors: dict
    origin: dict
    ignored: list
    author: str = None

    def describe(self, name):
        own = self.origin.get(name) or (_detectron2_to_caffe2(name) if self.format == "caffe2" else None) or name
        return name if own == name else f"{own} (Detectron2 name {name})"


_D2_IGNORED = re.compile(r"^(pixel_mean|pixel_std)$|num_batches_tracked$|anchor_generator\.cell_anchors")
_C2_IGNORED = re.compile(r"^(fc1000_[wb]|pred_[wb]|conv1_b)$")
_C2_NAME = re.compile(r"^(?:res(\d)_(\d+)_branch(1|2a|2b|2c)|res_conv1|conv1)(?:_(bn|gn))?_(w|b|s|rm|riv)$")
_C2_BRANCH = {"1": "shortcut", "2a": "conv1", "2b": "conv2", "2c": "conv3"}
_C2_SUFFIX = {"w": "weight", "b": "bias", "s": "weight", "rm": "running_mean", "riv": "running_var"}


def stage_prefix(stage):
    return "roi_heads.res5" if stage == 5 else f"backbone.res{stage}"


def _caffe2_to_detectron2(name):
    """``res2_0_branch2a_bn_s`` -> ``backbone.res2.0.conv1.norm.weight``; None for a name outside the ResNet."""
    match = _C2_NAME.match(name)
    if not match:
        return None
    stage, block, branch, norm, suffix = match.groups()
    if stage is not None:
        module = f"{stage_prefix(int(stage))}.{block}.{_C2_BRANCH[branch]}"
    else:
        module = "backbone.stem.conv1"
        if name.startswith("res_conv1") != bool(norm):  # conv1_w is the conv; res_conv1_bn_* its norm
            return None
    return f"{module}.norm.{_C2_SUFFIX[suffix]}" if norm else f"{module}.{_C2_SUFFIX[suffix]}"


def _detectron2_to_caffe2(name):
    """Inverse of :func:`_caffe2_to_detectron2` for the ResNet names (for messages); None otherwise."""
    inverse = {v: k for k, v in _C2_BRANCH.items()}
    suffix = {"weight": "w", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    match = re.match(r"^(?:backbone\.stem\.conv1|(?:backbone|roi_heads)\.res(\d)\.(\d+)\.(shortcut|conv[123]))"
                     r"(\.norm)?\.(weight|bias|running_mean|running_var)$", name)
    if not match:
        return None
    stage, block, branch, norm, what = match.groups()
    if norm and what == "weight":
        what_c2 = "s"
    else:
        what_c2 = suffix[what]
    if stage is None:
        return f"res_conv1_bn_{what_c2}" if norm else f"conv1_{what_c2}"
    return f"res{stage}_{block}_branch{inverse[branch]}" + ("_bn" if norm else "") + f"_{what_c2}"


def _as_array(name, value, path):
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.number):
        raise PretrainedError(f"{path}: entry '{name}' is not a numeric array ({type(value).__name__})")
    return value


def read_checkpoint(path):
    """Read a Detectron2 model-zoo ``.pkl`` or a Caffe2 ``R-50.pkl`` into a :class:`Checkpoint` (through
    :func:`safe_load`: a file asking for anything but containers, numbers, strings and numeric NumPy arrays is
    refused before any of it runs)."""
    data = safe_load(path)
    if not isinstance(data, dict):
        raise PretrainedError(f"'{path}' holds a {type(data).__name__}, not a Detectron2 checkpoint dict")
    if "model" in data and isinstance(data["model"], dict):  # Detectron2 (zoo file or a training checkpoint)
        author = data.get("__author__")
        tensors, origin, ignored = {}, {}, []
        for name, value in data["model"].items():
            if _D2_IGNORED.search(name):
                ignored.append(name)
                continue
            tensors[name] = _as_array(name, value, path)
        return Checkpoint(path, "detectron2", tensors, origin, ignored, author)
    blobs = data["blobs"] if isinstance(data.get("blobs"), dict) else data  # Detectron 1 files keep them there
    tensors, origin, ignored = {}, {}, []
    for name, value in blobs.items():
        if name.endswith("_momentum") or _C2_IGNORED.match(name):
            ignored.append(name)
            continue
        new = _caffe2_to_detectron2(name)
        if new is None:
            new = name  # reported as unknown later
        tensors[new] = _as_array(name, value, path)
        origin[new] = name
    if not tensors:
        raise PretrainedError(f"'{path}' holds no weights (keys: {sorted(data)[:10]})")
    return Checkpoint(path, "caffe2", tensors, origin, ignored, "Caffe2")


