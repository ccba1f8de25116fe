"""Image files: cheap header inspection at index time, and decoding without TensorFlow.

Owns: reading sizes, formats and EXIF orientation (:func:`inspect_image`), the truncation checks, the recovery of a
JPEG cut short (:func:`decode_truncated_jpeg`), the EXIF orientation rule (:func:`orient`), and the NumPy decoder
that the NumPy pipeline and inference share (:func:`read_image`, :func:`load_image`). Must not import TensorFlow.

Why headers only: checking every annotation's ``<size>`` against the real image, and catching missing, empty,
truncated or non-image files, must not cost a full decode (118k COCO images). Pillow's ``Image.open`` reads only the
header (the JPEG markers up to the first scan with the EXIF segment, the PNG chunks before the image data, the GIF /
BMP / WebP headers). Truncation is found from the end of the file: a JPEG without its end-of-image marker after the
header, a PNG without its ``IEND`` chunk in its last few KB. A JPEG cut short is decoded once more to count the rows
that arrived: it is used when at least :data:`TRUNCATED_JPEG_MIN_FRACTION` of them did (``ImageInfo.valid_rows``),
skipped otherwise.

The EXIF orientation (JPEG only, as before) is read here so that training and evaluation (which apply the record's
orientation to the stored pixels) and inference (:func:`load_image`) see the same upright image, whose size is what a
record stores. Decoders are told to ignore EXIF themselves, since a reader may set a record's orientation to 1 when
the annotation describes the stored pixels (:func:`reconcile_size`).
"""

import io
import logging
import os
from dataclasses import dataclass

import numpy as np

# EXIF orientations 5..8 swap width and height.
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_TAIL_BYTES = 4096
# A JPEG cut short (a download that stopped) is used when at least this fraction of its rows arrived; the rows
# that did not arrive are filled with TRUNCATED_FILL. Below it, too much of the image (and of its annotated
# objects) is missing for the picture to teach or test anything: the image is skipped.
TRUNCATED_JPEG_MIN_FRACTION = 0.5
TRUNCATED_FILL = 128  # mid-gray: the decoder's extrapolated colours for the missing rows are arbitrary
TRUNCATED_ACTION = "the rows that arrived are used, the rest is filled with gray"

_JPEG_END = b"\xff\xd9"
# Appended to a JPEG cut short before decoding it a second time: no 0xFF byte, so no marker inside it.
_FILLER = bytes(range(1, 255)) * 4
# Pillow's format name -> ours. MPO: a JPEG with extra frames (some cameras); decoders read its first frame.
_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp"}


class ImageProblem(Exception):
    """An image file that cannot be used; ``str(err)`` is the problem, without the path."""


class UnknownFormat(ImageProblem):
    """A file that is none of the formats the pipelines read (JPEG, PNG, GIF, BMP, WebP)."""


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as displayed: after the EXIF orientation
    height: int
    format: str  # jpeg | png | gif | bmp | webp
    orientation: int = 1  # EXIF orientation 1..8 (JPEG only; 1 = as stored)
    valid_rows: int = 0  # a truncated JPEG: how many rows (of the stored image, from the top) arrived; 0 = all

    @property
    def recovered(self):
        """Fraction of the stored rows that arrived (1.0 for a complete file)."""
        stored_height = self.width if self.orientation in TRANSPOSED_ORIENTATIONS else self.height
        return self.valid_rows / stored_height if self.valid_rows else 1.0


def _sniff(magic):
    """Pillow's name of the format the first bytes announce, or None."""
    if magic.startswith(b"\xff\xd8"):
        return "JPEG"
    if magic.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if magic[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if magic.startswith(b"BM"):
        return "BMP"
    if magic.startswith(b"RIFF") and magic[8:12] == b"WEBP":
        return "WEBP"
    return None


def _exif_orientation(image):
    """The EXIF orientation tag of an opened JPEG, 1 when absent or malformed."""
    try:
        value = int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF of any kind means "no orientation", as for other readers
        return 1
    return value if 1 <= value <= 8 else 1


def inspect_image(path):
    """Size, format and EXIF orientation of an image file from its header, without decoding it.

    Raises :class:`ImageProblem` (message without the path) for a missing, empty, truncated or unrecognised file.
    The width and height returned are those of the displayed image (EXIF orientation applied).
    """
    from PIL import Image

    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ImageProblem("image file is missing") from None
    except OSError as err:
        raise ImageProblem(f"image file cannot be read ({err.strerror})") from None
    if size == 0:
        raise ImageProblem("image file is empty (0 bytes)")
    try:
        with open(path, "rb") as f:
            magic = f.read(12)
            kind = _sniff(magic)
            if kind is None:
                # The file's bytes are not quoted: a path that reaches outside the data (a hostile annotation)
                # must not copy what it reads into the log.
                raise UnknownFormat(f"not a JPEG, PNG, GIF, BMP or WebP image ({size} bytes with no image "
                                    "signature)")
            f.seek(0)
            try:
                with Image.open(f, formats=["JPEG", "MPO"] if kind == "JPEG" else [kind]) as image:
                    width, height = image.size
                    fmt = _FORMATS.get(image.format, kind.lower())
                    orientation = _exif_orientation(image) if fmt == "jpeg" else 1
                    scan_start = image.tile[0][2] if image.tile else 0
            except Image.DecompressionBombError as err:
                raise ImageProblem(f"image too large to decode ({err})") from None
            except (OSError, SyntaxError, ValueError, IndexError, EOFError) as err:  # Pillow's ways to say "corrupt"
                raise ImageProblem(f"corrupt {kind} header ({err})") from None
            if width <= 0 or height <= 0:
                raise ImageProblem(f"unsupported {kind}: its header gives size {width}x{height}")
            valid_rows = 0
            if fmt == "jpeg":
                if not _has_jpeg_end(f, size, scan_start):
                    valid_rows = _truncated_jpeg_rows(f, height)
            elif fmt == "png":
                f.seek(max(0, size - _TAIL_BYTES))
                if b"IEND" not in f.read():
                    raise ImageProblem("truncated PNG (no IEND chunk)")
    except OSError as err:
        raise ImageProblem(f"image file cannot be read ({err.strerror or err})") from None
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(width, height, fmt, orientation, valid_rows)


def _has_jpeg_end(f, size, scan_start):
    """A complete JPEG has an end-of-image marker after its header (an EXIF thumbnail has its own, before it);
    without one it was cut short."""
    f.seek(max(scan_start, size - _TAIL_BYTES))
    if _JPEG_END in f.read():
        return True
    # Rare: data appended after the end marker (some cameras do this). Look through the whole image data.
    f.seek(scan_start)
    return _JPEG_END in f.read()


def _truncated_jpeg_rows(f, height):
    """How many rows of a JPEG cut short arrived; :class:`ImageProblem` when fewer than
    :data:`TRUNCATED_JPEG_MIN_FRACTION` of ``height`` did."""
    f.seek(0)
    rows = truncated_jpeg_rows(f.read())
    if rows < TRUNCATED_JPEG_MIN_FRACTION * height:
        raise ImageProblem(f"truncated JPEG (no end-of-image marker): only {rows} of its {height} rows "
                           f"({rows / height:.0%}) arrived, fewer than the {TRUNCATED_JPEG_MIN_FRACTION:.0%} needed")
    return rows


def truncated_problem(info):
    """The report's wording for a JPEG cut short that is still used."""
    return f"truncated JPEG (no end-of-image marker): {info.recovered:.0%} of its rows arrived"


def _decode_jpeg_ended(data):
    """``data`` (a JPEG cut short) with an end-of-image marker appended, decoded by Pillow to ``(H, W, 3)`` uint8 RGB
    stored pixels; libjpeg invents the rows after the end of the data. None when nothing decodes."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data + _JPEG_END), formats=["JPEG", "MPO"]) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, IndexError, EOFError):
        return None


def truncated_jpeg_rows(data):
    """How many rows (from the top of the stored image) of the JPEG ``data`` cut short arrived; 0 when nothing
    decodes.

    A decoder fed a cut JPEG decodes what arrived and lets libjpeg invent the rest, without saying where the real
    data ends. So the data is decoded twice, once ending right there and once with arbitrary bytes appended: the
    rows that arrived decode the same both times, the invented ones do not. Pillow here; TensorFlow's decoder (the
    ``tf.data`` pipeline) gives the same count (tests/test_data.py checks it).
    """
    first = _decode_jpeg_ended(data)
    second = _decode_jpeg_ended(data + _FILLER)
    if first is None or second is None or first.shape != second.shape:
        return 0
    differs = np.flatnonzero(np.any(first != second, axis=(1, 2)))
    return int(differs[0]) if len(differs) else first.shape[0]


def decode_truncated_jpeg(data, rows=None):
    """Decode a JPEG that was cut short: ``(image, rows)``, ``image`` the ``(H, W, 3)`` uint8 RGB stored pixels
    (EXIF orientation NOT applied) with the rows that did not arrive set to :data:`TRUNCATED_FILL`, ``rows`` how
    many arrived from the top (:func:`truncated_jpeg_rows` unless given; 0 and ``image`` None when nothing
    decodes)."""
    if rows is None:
        rows = truncated_jpeg_rows(data)
    image = _decode_jpeg_ended(data) if rows else None
    if image is None:
        return None, 0
    image = np.array(image)  # writable
    image[rows:] = TRUNCATED_FILL
    return image, rows


# EXIF orientation 1..8 -> the stored pixels turned upright, as OpenCV and PIL do when loading. ``xp`` is numpy or
# tensorflow.experimental.numpy (the tf.data pipeline switches between these with tf.switch_case).
_ORIENTATIONS = {
    1: lambda x, xp: x,  # as stored
    2: lambda x, xp: x[:, ::-1],  # mirrored left-right
    3: lambda x, xp: x[::-1, ::-1],  # rotated 180
    4: lambda x, xp: x[::-1],  # mirrored top-bottom
    5: lambda x, xp: xp.transpose(x, (1, 0, 2)),  # transposed
    6: lambda x, xp: xp.transpose(x, (1, 0, 2))[:, ::-1],  # rotated 90 clockwise
    7: lambda x, xp: xp.transpose(x, (1, 0, 2))[::-1, ::-1],  # transverse
    8: lambda x, xp: xp.transpose(x, (1, 0, 2))[::-1],  # rotated 90 counter-clockwise
}


def orient(image, orientation, xp=np):
    """EXIF ``orientation`` (a Python int 1..8; others mean 1) applied to ``(H, W, C)`` stored pixels."""
    return _ORIENTATIONS.get(int(orientation), _ORIENTATIONS[1])(image, xp)


def decode_image(data, orientation=1, valid_rows=0):
    """Encoded bytes -> ``(H, W, 3)`` uint8 RGB (grayscale replicated, alpha dropped, first frame of a GIF), EXIF
    ``orientation`` applied (the file's own EXIF is ignored). ``valid_rows`` > 0: a JPEG cut short, of which those
    rows are used and the rest filled with :data:`TRUNCATED_FILL`. Raises :class:`ImageProblem` with the reason.

    OpenCV decodes (it releases the GIL, so threads decode in parallel); a JPEG cut short and a GIF OpenCV cannot
    read go through Pillow.
    """
    import cv2

    if not len(data):
        raise ImageProblem("image file is empty (0 bytes)")
    if valid_rows:
        image, _ = decode_truncated_jpeg(bytes(data), valid_rows)
        if image is None:
            raise ImageProblem("truncated JPEG: nothing decodes")
    else:
        buffer = np.frombuffer(data, np.uint8)
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is not None:
            image = image[:, :, ::-1]  # OpenCV's BGR -> RGB
        elif bytes(buffer[:6]) in (b"GIF87a", b"GIF89a"):
            image = _decode_with_pillow(bytes(data))
        if image is None:
            raise ImageProblem("OpenCV cannot decode it (corrupt pixel data or an unsupported format)")
    return np.ascontiguousarray(orient(image, orientation))


def _decode_with_pillow(data):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, IndexError, EOFError):
        return None


def read_image(path, orientation=1, valid_rows=0):
    """:func:`decode_image` of the file ``path``; :class:`ImageProblem` when it is missing, unreadable or does not
    decode."""
    try:
        data = np.fromfile(path, dtype=np.uint8)  # any path encoding
    except FileNotFoundError:
        raise ImageProblem("image file is missing") from None
    except OSError as err:
        raise ImageProblem(f"image file cannot be read ({err.strerror or err})") from None
    return decode_image(data, orientation, valid_rows)


def load_image(path):
    """Read one image for inference: ``(H, W, 3)`` uint8 RGB, EXIF orientation applied.

    The same pixels as the NumPy pipeline's (header through :func:`inspect_image`, then :func:`read_image`); a file
    in another format OpenCV reads (TIFF, ...) is decoded by OpenCV as it is. Grayscale becomes three equal channels;
    an alpha channel is dropped; 16-bit images are scaled to 8 bits. A JPEG cut short gives the rows that arrived
    (a warning names the file and the fraction) when enough did. Raises ``frcnn.data.DataError`` naming the file
    when it is missing or cannot be decoded.
    """
    from frcnn.data.records import DataError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"image file {path} does not exist")
    try:
        info = inspect_image(path)
    except UnknownFormat:
        return _load_other_format(path)
    except ImageProblem as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    try:
        image = read_image(path, info.orientation, info.valid_rows)
    except ImageProblem as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    if info.valid_rows:
        logging.getLogger("frcnn.data").warning(
            "%s: truncated JPEG, %d%% of its rows arrived -> the rest is filled with gray", path,
            round(100 * info.recovered))
    return image


def _load_other_format(path):
    import cv2

    from frcnn.data.records import DataError

    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)  # IMREAD_COLOR: 3 channels, EXIF orientation applied
    if image is None:
        raise DataError(f"cannot read image {path}: not a decodable image file (corrupt or unsupported format)")
    return np.ascontiguousarray(image[:, :, ::-1])


def reconcile_size(info, annotated):
    """Decide the size of an image whose annotation says ``annotated = (width, height)`` (or None).

    The real image wins, with one exception: when an EXIF rotation by 90 degrees explains the disagreement (the
    annotation gives the stored, unrotated size), the annotation was made on the stored pixels, so the orientation
    is ignored for this image. Returns ``(width, height, orientation, problem)``, ``problem`` None when they agree.
    """
    real = (info.width, info.height)
    if annotated is None or annotated == real:
        return info.width, info.height, info.orientation, None
    if info.orientation in TRANSPOSED_ORIENTATIONS and tuple(annotated) == (info.height, info.width):
        return info.height, info.width, 1, "orientation"
    return info.width, info.height, info.orientation, "size"
