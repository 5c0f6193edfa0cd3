"""Radiograph I/O: one function that turns a PNG/JPEG/TIFF or DICOM file into a display-ready float image.

``read_image`` always returns a float32 (H, W) array in [0, 1] in *display orientation*: higher values are brighter on
a standard viewer (bone bright, air dark), whatever the file's photometric interpretation. ``to_square_uint8`` is the
resize-and-pad step shared by ``rvl prepare`` and ``StudyDataset`` (so decoding on the fly and reading the prepared
cache give the same pixels).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["ImageReadError", "DegenerateImageError", "read_image", "is_dicom_file", "to_square_uint8",
           "square_geometry", "box_to_square", "check_not_degenerate", "MIN_IMAGE_SIDE"]

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
# Percentiles used to scale DICOMs without a VOI LUT / window: robust against a few hot or dead pixels and collimator
# edges, which plain min-max would let dominate the contrast.
ROBUST_PERCENTILES = (0.5, 99.5)
DICOM_EXTRA_HINT = "install the DICOM decoders with: pip install 'rvl-cxr[dicom]'"
# Smallest side an image may have to be scored or indexed: below it the model sees an upscaled blur of a few pixels, and
# its zero-shot probabilities or neighbours would look like those of a real study.
MIN_IMAGE_SIDE = 32
# A DICOM header may claim any size; pixel data past this many pixels is refused before it is allocated (a
# decompression bomb: 30,000 x 30,000 x 16 bit would be 1.8 GB). 2**28 px = 16k x 16k, twice the largest detector.
MAX_IMAGE_PIXELS = 2 ** 28


class ImageReadError(ValueError):
    """An image file could not be read; the message names the path and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class DegenerateImageError(ImageReadError):
    """An image that decodes but cannot be a radiograph: smaller than ``MIN_IMAGE_SIDE`` or without any variation."""


def check_not_degenerate(image: np.ndarray, path: str | os.PathLike, min_side: int = MIN_IMAGE_SIDE,
                         override: str = "", original_shape: tuple[int, int] | None = None) -> None:
    """Raise :class:`DegenerateImageError` for an image too small to score or with every pixel equal.

    Args:
        image: the decoded (H, W) image (before any resize: the original size is what is checked).
        path: named in the message.
        min_side: smallest accepted height and width.
        override: how the caller lets such images through (appended to the message, e.g. "pass --allow-degenerate").
        original_shape: (height, width) of the original when ``image`` is a resized copy (a prepared cache).
    """
    height, width = image.shape[:2] if original_shape is None else original_shape
    hint = f"; {override}" if override else ""
    if min(height, width) < min_side:
        raise DegenerateImageError(path, f"{width} x {height} px{' (original)' if original_shape else ''} is smaller "
                                         f"than the {min_side} px minimum for "
                                         f"zero-shot / indexing{hint}")
    if image.size and float(image.max()) == float(image.min()):
        raise DegenerateImageError(path, f"every pixel has the same value ({float(image.flat[0]):.3g}): no image "
                                         f"content to score{hint}")


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file has a DICOM suffix or the 'DICM' magic at byte 128."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a radiograph as float32 (H, W) in [0, 1], display orientation (higher = brighter).

    PNG/JPEG/TIFF (8- and 16-bit) are read with Pillow; DICOM with pydicom (modality LUT, then VOI LUT / window when
    present, else robust percentile min-max; MONOCHROME1 inverted; first frame of multi-frame images; RGB ->
    luminance).

    Raises:
        ImageReadError: missing file, not an image, truncated/corrupt file, no pixel data, unsupported or undecodable
            transfer syntax. The message names the path and the cause.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    if is_dicom_file(path):
        return _read_dicom(path)
    return _read_pillow(path)


# ----------------------------------------------------------------------------------------------------------- Pillow
def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                warnings.warn(f"{path}: {n_frames} frames, using the first", stacklevel=3)
                img.seek(0)
            img = ImageOps.exif_transpose(img)  # JPEGs from phones/scanners may carry a rotation flag
            return _pil_to_float(img, path)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (Pillow cannot identify the format)") from None
    except Image.DecompressionBombError as e:  # refused by Pillow from the header, before any pixel is allocated
        raise ImageReadError(path, f"refused before decoding: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data surfaces as OSError from the decoder
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(path, f"truncated or corrupt image ({e})") from None


def _pil_to_float(img, path: Path) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.dtype.kind == "i" and arr.min() < 0:
            return _min_max(arr.astype(np.float32))
        # 16-bit containers often hold 10/12/14-bit detector data: scale by the smallest such range covering the data
        # so a 12-bit film is not rendered at 1/16 brightness.
        vmax = float(arr.max())
        bits = next((b for b in (8, 10, 12, 14, 16) if vmax <= 2 ** b - 1), None)
        if bits is None:
            return _min_max(arr.astype(np.float32))
        return (arr.astype(np.float32) / float(2 ** bits - 1)).clip(0.0, 1.0)
    if mode == "F":
        return _min_max(np.asarray(img, dtype=np.float32))
    if mode != "L":
        if mode in ("1", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("L")  # ITU-R 601 luminance
        else:
            raise ImageReadError(path, f"unsupported image mode {mode!r}")
    return np.asarray(img, dtype=np.float32) / 255.0


# ------------------------------------------------------------------------------------------------------------ DICOM
def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        _check_dicom_size(path)
        ds = pydicom.dcmread(path)
    except ImageReadError:
        raise
    except InvalidDicomError as e:
        raise ImageReadError(path, f"not a valid DICOM file ({e})") from None
    except Exception as e:  # pydicom raises EOFError/OSError/struct errors/ValueError on truncated headers
        raise ImageReadError(path, f"truncated or corrupt DICOM ({type(e).__name__}: {e})") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # pydicom stops quietly at end-of-file, so a cut file looks like one without pixels: tell them apart
        if len(ds) == 0:
            raise ImageReadError(path, "truncated or corrupt DICOM (no data elements after the file meta header)")
        if "Rows" in ds and "BitsAllocated" in ds:
            raise ImageReadError(path, "truncated or corrupt DICOM (image attributes present but the pixel data "
                                       "element is missing)")
        raise ImageReadError(path, f"DICOM has no pixel data (SOP class {ds.get('SOPClassUID', 'unknown')!s}, "
                                   f"modality {ds.get('Modality', 'unknown')})")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = _decode_dicom_pixels(ds, path, n_frames)
    if n_frames > 1:
        warnings.warn(f"{path}: multi-frame DICOM ({n_frames} frames), using the first", stacklevel=3)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if samples > 1 or arr.ndim == 3:
        return _dicom_colour_to_gray(arr, ds)
    return _dicom_mono_to_display(arr, ds, photometric)


def _check_dicom_size(path: Path) -> None:
    """Refuse a DICOM whose header claims more than ``MAX_IMAGE_PIXELS`` per frame, or whose deflated body inflates
    past the bytes such an image could need, before the pixel data is read or allocated (decompression bombs)."""
    import zlib

    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = pydicom.filereader.read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        limit, inflated = MAX_IMAGE_PIXELS * 8, 0
        with open(path, "rb") as f:
            # preamble + "DICM" + the (plain) meta group: group length element (12 bytes) + its value; then the rest
            # is deflated: inflate it in bounded steps
            f.seek(128 + 4 + 12 + int(meta.FileMetaInformationGroupLength))
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            while chunk := f.read(1 << 20):
                while chunk:
                    inflated += len(inflater.decompress(chunk, 1 << 24))
                    chunk = inflater.unconsumed_tail
                    if inflated > limit:
                        raise ImageReadError(path, f"deflated data inflates past {limit >> 20} MB: refused before "
                                                   "decoding (decompression bomb?)")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    rows, cols = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    if rows * cols * samples > MAX_IMAGE_PIXELS:
        raise ImageReadError(path, f"header claims {cols} x {rows} px x {samples} sample(s), over the "
                                   f"{MAX_IMAGE_PIXELS >> 20} M px limit: refused before decoding (decompression "
                                   "bomb or corrupt header)")


def _decode_dicom_pixels(ds, path: Path, n_frames: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = getattr(tsyntax, "name", str(tsyntax))
    pydicom_logger = logging.getLogger("pydicom")
    level = pydicom_logger.level
    # pydicom logs each failing decoder plugin with a full traceback; the ImageReadError below carries their messages
    pydicom_logger.setLevel(logging.CRITICAL)
    try:
        if n_frames > 1:
            # decode only the first frame: a 60-frame fluoro series must not cost 60 decodes
            return pixel_array(ds, index=0)
        return ds.pixel_array
    except NotImplementedError as e:
        raise ImageReadError(path, f"unsupported transfer syntax {ts_name!r} ({e})") from None
    except RuntimeError as e:
        if "missing dependencies" in str(e):
            raise ImageReadError(path, f"no decoder installed for transfer syntax {ts_name!r}: "
                                       f"{DICOM_EXTRA_HINT}") from None
        raise ImageReadError(path, f"cannot decode pixel data ({ts_name}): {e}") from None
    except Exception as e:  # short pixel data, bad fragments, decoder errors
        raise ImageReadError(path, f"truncated or corrupt DICOM pixel data ({ts_name}: {type(e).__name__}: "
                                   f"{e})") from None
    finally:
        pydicom_logger.setLevel(level)


def _dicom_mono_to_display(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)
    voi_range = _voi_output_range(ds)
    if voi_range is not None:
        values = apply_voi_lut(values, ds, index=0)
        lo, hi = voi_range
        out = (np.asarray(values, dtype=np.float64) - lo) / max(hi - lo, 1e-12)
        out = out.astype(np.float32).clip(0.0, 1.0)
    else:
        out = _robust_scale(np.asarray(values, dtype=np.float32))
    inverse = photometric == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        inverse = not inverse  # the presentation LUT flips the photometric interpretation once more
    if inverse:
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32)


def _voi_output_range(ds) -> tuple[float, float] | None:
    """Output range of ``apply_voi_lut`` for this dataset, or None when it has no VOI LUT / window.

    pydicom's windowing maps to the modality output range (PS3.3 C.11.2.1.2) and a VOI LUT sequence to
    [0, 2**bits - 1]; dividing by that range keeps the window's meaning instead of re-stretching the result.
    """
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq and voi_seq[0].get("LUTDescriptor") is not None and voi_seq[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(voi_seq[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2 ** bits - 1)
    else:
        y_min, y_max = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return (min(y_min, y_max), max(y_min, y_max))


def _dicom_colour_to_gray(arr: np.ndarray, ds) -> np.ndarray:
    # pydicom converts YBR to RGB by default, so this is RGB; ITU-R 601 luminance like Pillow's convert("L")
    rgb = arr.astype(np.float32)
    lum = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    bits = int(ds.get("BitsStored", 8))
    return (lum / float(2 ** bits - 1)).clip(0.0, 1.0).astype(np.float32)


def _robust_scale(values: np.ndarray) -> np.ndarray:
    sample = values[:: max(1, values.shape[0] // 512), :: max(1, values.shape[1] // 512)]  # percentiles on ~512^2
    lo, hi = np.percentile(sample, ROBUST_PERCENTILES)
    if hi <= lo:
        return _min_max(values)
    return ((values - lo) / (hi - lo)).clip(0.0, 1.0).astype(np.float32)


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- square resize + pad
def square_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of an image resized so its long side is ``size`` and centred in a size x size frame."""
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def to_square_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a float [0, 1] image (long side = ``size``, aspect kept) and centre it on a zero size x size canvas.

    Resampling is done in float (Pillow mode 'F', antialiased bilinear) before quantising, so 12-16-bit sources keep
    their precision until the last step.
    """
    from PIL import Image

    height, width = image.shape
    new_h, new_w, top, left = square_geometry(height, width, size)
    if (new_h, new_w) != (height, width):
        resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
        image = np.asarray(resized.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0))
    canvas = np.zeros((size, size), np.uint8)
    canvas[top:top + new_h, left:left + new_w] = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return canvas


def box_to_square(box: list[float], height: int, width: int, size: int) -> list[float]:
    """Re-express a normalised [x0, y0, x1, y1] box of an (height, width) image in the padded square frame."""
    new_h, new_w, top, left = square_geometry(height, width, size)
    x0, y0, x1, y1 = (float(v) for v in box)
    return [(left + x0 * new_w) / size, (top + y0 * new_h) / size, (left + x1 * new_w) / size,
            (top + y1 * new_h) / size]
