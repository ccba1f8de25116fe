"""Image files: cheap header inspection at index time, and a single-image loader for inference.

Why a header parser: checking every annotation's ``<size>`` against the real image, and catching missing, empty,
truncated or non-image files, must not cost a full decode (118k COCO images). :func:`inspect_image` reads only
the first few segments of the file (JPEG markers up to the frame header, the PNG ``IHDR`` chunk, the GIF / BMP /
WebP headers) plus its last few KB (the JPEG end-of-image marker, the PNG ``IEND`` chunk) to detect truncation.
A JPEG cut short is decoded once, to count the rows that arrived (:func:`decode_truncated_jpeg`): it is used when
at least :data:`TRUNCATED_JPEG_MIN_FRACTION` of them did (``ImageInfo.valid_rows``), skipped otherwise.
It also reads the JPEG EXIF orientation, so training (which applies it in the ``tf.data`` graph) and inference
(:func:`load_image`, OpenCV applies it) see the same upright image, whose size is what a record stores.
"""

import os
import struct
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


class ImageProblem(Exception):
    """An image file that cannot be used; ``str(err)`` is the problem, without the path."""


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


def _u16be(b, o=0):
    return struct.unpack_from(">H", b, o)[0]


def _exif_orientation(segment):
    """The orientation tag of an APP1 EXIF segment body (after the length field), 1 when absent or malformed."""
    if not segment.startswith(b"Exif\x00\x00"):
        return 1
    tiff = segment[6:]
    if len(tiff) < 8:
        return 1
    order = tiff[:2]
    if order == b"II":
        end = "<"
    elif order == b"MM":
        end = ">"
    else:
        return 1
    try:
        (magic,) = struct.unpack_from(end + "H", tiff, 2)
        (ifd,) = struct.unpack_from(end + "I", tiff, 4)
        if magic != 42:
            return 1
        (count,) = struct.unpack_from(end + "H", tiff, ifd)
        for i in range(count):
            tag, typ, _n = struct.unpack_from(end + "HHI", tiff, ifd + 2 + 12 * i)
            if tag == 0x0112 and typ == 3:
                (value,) = struct.unpack_from(end + "H", tiff, ifd + 2 + 12 * i + 8)
                return value if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_info(f, size):
    f.seek(2)
    orientation = 1
    while True:
        byte = f.read(1)
        if not byte:
            raise ImageProblem("corrupt JPEG: no frame header before the end of the file")
        if byte != b"\xff":
            raise ImageProblem(f"corrupt JPEG: expected a marker at byte {f.tell() - 1}")
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            raise ImageProblem("corrupt JPEG: truncated header")
        m = marker[0]
        if m == 0x01 or m == 0xD8 or 0xD0 <= m <= 0xD7:  # markers without a payload
            continue
        if m in (0xD9, 0xDA):
            raise ImageProblem("corrupt JPEG: no frame header before the image data")
        raw = f.read(2)
        if len(raw) < 2:
            raise ImageProblem("corrupt JPEG: truncated header")
        length = _u16be(raw)
        if length < 2:
            raise ImageProblem("corrupt JPEG: bad segment length")
        if m in _SOF_MARKERS:
            body = f.read(5)
            if len(body) < 5:
                raise ImageProblem("corrupt JPEG: truncated frame header")
            height, width = _u16be(body, 1), _u16be(body, 3)
            if width == 0 or height == 0:
                raise ImageProblem(f"unsupported JPEG: frame header gives size {width}x{height}")
            sof_end = f.tell()
            valid_rows = 0
            if not _has_jpeg_end(f, size, sof_end):
                valid_rows = _truncated_jpeg_rows(f, height)
            if orientation in TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            return ImageInfo(width, height, "jpeg", orientation, valid_rows)
        if m == 0xE1 and orientation == 1:
            body = f.read(length - 2)
            orientation = _exif_orientation(body)
        else:
            f.seek(length - 2, os.SEEK_CUR)


def _has_jpeg_end(f, size, sof_end):
    """A complete JPEG has an end-of-image marker after its frame header; without one it was cut short."""
    f.seek(max(sof_end, size - _TAIL_BYTES))
    if b"\xff\xd9" in f.read():
        return True
    # Rare: data appended after the end marker (some cameras do this). Look through the whole image data.
    f.seek(sof_end)
    return b"\xff\xd9" in f.read()


def _truncated_jpeg_rows(f, height):
    """How many rows of a JPEG cut short arrived; :class:`ImageProblem` when fewer than
    :data:`TRUNCATED_JPEG_MIN_FRACTION` of ``height`` did."""
    f.seek(0)
    _, rows = decode_truncated_jpeg(f.read())
    if rows < TRUNCATED_JPEG_MIN_FRACTION * height:
        raise ImageProblem(f"truncated JPEG (no end-of-image marker): only {rows} of its {height} rows "
                           f"({rows / height:.0%}) arrived, fewer than the {TRUNCATED_JPEG_MIN_FRACTION:.0%} needed")
    return rows


TRUNCATED_ACTION = "the rows that arrived are used, the rest is filled with gray"


def truncated_problem(info):
    """The report's wording for a JPEG cut short that is still used."""
    return f"truncated JPEG (no end-of-image marker): {info.recovered:.0%} of its rows arrived"


def decode_truncated_jpeg(data):
    """Decode a JPEG that was cut short: ``(image, rows)``, ``image`` the ``(H, W, 3)`` uint8 RGB stored pixels
    (EXIF orientation NOT applied) with the rows that did not arrive set to :data:`TRUNCATED_FILL`, ``rows`` how
    many arrived from the top (0 and ``image`` None when nothing decodes).

    TensorFlow's ``try_recover_truncated`` decodes what arrived and lets libjpeg invent the rest, without saying
    where the real data ends (``acceptable_fraction`` does not see it either: libjpeg reports every row as read).
    So the data is decoded twice, once ending right there and once with arbitrary bytes appended: the rows that
    arrived decode the same both times, the invented ones do not.
    """
    import tensorflow as tf  # the training pipeline decodes with TensorFlow: measure with the same decoder

    end = b"\xff\xd9"
    filler = bytes(range(1, 255)) * 4  # no 0xFF: no marker inside the filler
    try:
        a = tf.io.decode_jpeg(data + end, channels=3, try_recover_truncated=True).numpy()
        b = tf.io.decode_jpeg(data + filler + end, channels=3, try_recover_truncated=True).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        return None, 0
    differs = np.flatnonzero(np.any(a != b, axis=(1, 2)))
    rows = int(differs[0]) if len(differs) else a.shape[0]
    a[rows:] = TRUNCATED_FILL
    return a, rows


def _png_info(f, size):
    head = f.read(24)
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise ImageProblem("corrupt PNG: no IHDR chunk")
    width, height = struct.unpack_from(">II", head, 16)
    if width == 0 or height == 0:
        raise ImageProblem(f"corrupt PNG: size {width}x{height}")
    f.seek(max(0, size - _TAIL_BYTES))
    if b"IEND" not in f.read():
        raise ImageProblem("truncated PNG (no IEND chunk)")
    return ImageInfo(width, height, "png")


def _gif_info(f, size):
    head = f.read(10)
    if len(head) < 10:
        raise ImageProblem("corrupt GIF: truncated header")
    width, height = struct.unpack_from("<HH", head, 6)
    return ImageInfo(width, height, "gif")


def _bmp_info(f, size):
    head = f.read(26)
    if len(head) < 26:
        raise ImageProblem("corrupt BMP: truncated header")
    (dib,) = struct.unpack_from("<I", head, 14)
    if dib == 12:
        width, height = struct.unpack_from("<HH", head, 18)
    else:
        width, height = struct.unpack_from("<ii", head, 18)
    return ImageInfo(abs(width), abs(height), "bmp")


def _webp_info(f, size):
    head = f.read(30)
    if len(head) < 30:
        raise ImageProblem("corrupt WebP: truncated header")
    chunk = head[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(head[24:27], "little")
        height = 1 + int.from_bytes(head[27:30], "little")
    elif chunk == b"VP8 ":
        width = struct.unpack_from("<H", head, 26)[0] & 0x3FFF
        height = struct.unpack_from("<H", head, 28)[0] & 0x3FFF
    elif chunk == b"VP8L":
        bits = struct.unpack_from("<I", head, 21)[0]
        width = (bits & 0x3FFF) + 1
        height = ((bits >> 14) & 0x3FFF) + 1
    else:
        raise ImageProblem(f"corrupt WebP: unknown chunk {chunk!r}")
    return ImageInfo(width, height, "webp")


def inspect_image(path):
    """Size, format and EXIF orientation of an image file from its header, without decoding it.

    Raises :class:`ImageProblem` (message without the path) for a missing, empty, truncated or unrecognised file.
    The width and height returned are those of the displayed image (EXIF orientation applied).
    """
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
            f.seek(0)
            if magic.startswith(b"\xff\xd8"):
                return _jpeg_info(f, size)
            if magic.startswith(b"\x89PNG\r\n\x1a\n"):
                return _png_info(f, size)
            if magic[:6] in (b"GIF87a", b"GIF89a"):
                return _gif_info(f, size)
            if magic.startswith(b"BM"):
                return _bmp_info(f, size)
            if magic.startswith(b"RIFF") and magic[8:12] == b"WEBP":
                return _webp_info(f, size)
    except OSError as err:
        raise ImageProblem(f"image file cannot be read ({err.strerror})") from None
    except struct.error:
        raise ImageProblem("corrupt image header") from None
    # The file's bytes are not quoted: a path that reaches outside the data (a hostile annotation) must not copy
    # what it reads into the log.
    raise ImageProblem(f"not a JPEG, PNG, GIF, BMP or WebP image ({size} bytes with no image signature)")


def load_image(path):
    """Read one image for inference: ``(H, W, 3)`` uint8 RGB, EXIF orientation applied.

    Grayscale becomes three equal channels; an alpha channel is dropped; 16-bit images are scaled to 8 bits.
    Raises ``frcnn.data.DataError`` naming the file when it is missing or cannot be decoded.
    """
    import cv2  # imported here: only inference needs OpenCV

    from frcnn.data.records import DataError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"image file {path} does not exist")
    # np.fromfile + imdecode instead of imread: works with any path encoding, and gives one place for errors.
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise DataError(f"cannot read image {path}: the file is empty")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)  # IMREAD_COLOR: 3 channels, EXIF orientation applied
    if image is None:
        recovered = _load_truncated_jpeg(path)
        if recovered is not None:
            return recovered
        raise DataError(f"cannot read image {path}: not a decodable image file (corrupt or unsupported format)")
    return np.ascontiguousarray(image[:, :, ::-1])  # OpenCV's BGR -> RGB


def _load_truncated_jpeg(path):
    """The rows that arrived of a JPEG cut short (OpenCV returns nothing for it), with a warning naming the file
    and the fraction recovered; None when ``path`` is not such a JPEG. :class:`DataError` below
    :data:`TRUNCATED_JPEG_MIN_FRACTION`, as in training and evaluation."""
    import logging

    from frcnn.data.records import DataError

    try:
        info = inspect_image(path)
    except ImageProblem as err:
        if str(err).startswith("truncated JPEG"):
            raise DataError(f"cannot read image {path}: {err}") from None
        return None
    if not info.valid_rows:
        return None
    with open(path, "rb") as f:
        image, _ = decode_truncated_jpeg(f.read())
    logging.getLogger("frcnn.data").warning(
        "%s: truncated JPEG, %d%% of its rows arrived -> the rest is filled with gray", path,
        round(100 * info.recovered))
    return _orient(image, info.orientation)


def _orient(image, orientation):
    """EXIF ``orientation`` (1..8) applied to ``(H, W, C)`` stored pixels, as OpenCV does when it loads a file."""
    ops = {
        2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
        5: lambda x: x.transpose(1, 0, 2), 6: lambda x: np.rot90(x, k=3), 7: lambda x: x.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda x: np.rot90(x, k=1),
    }
    return np.ascontiguousarray(ops.get(orientation, lambda x: x)(image))


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
