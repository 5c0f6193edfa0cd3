"""Uploaded radiographs: size / count limits, decoding through :func:`rvl.data.io.read_image` inside a temporary
folder that is removed afterwards, and the DICOM header fields the page uses (view, patient id, study date)."""
from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".dic"}


class UploadError(ValueError):
    """An uploaded file cannot be used; the message names the file (as the client called it) and why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class UploadedImage:
    """One decoded upload: the display image (float32 ``(H, W)`` in [0, 1]) and what its header says."""

    name: str
    image: np.ndarray
    view: str = "OTHER"
    patient_id: str | None = None
    study_date: str | None = None


@dataclass
class UploadedStudy:
    """The images of one uploaded study and a content digest (the key of the server's study cache)."""

    images: list[UploadedImage]
    digest: str
    patient_id: str | None = None
    study_date: str | None = None
    views: list[str] = field(default_factory=list)


def upload_digest(files: Sequence[tuple[str, bytes]], views: Sequence[str] | None) -> str:
    """Identifies an upload by its bytes and the views asked for (file names play no part)."""
    digest = hashlib.sha256()
    for _, data in files:
        digest.update(hashlib.sha256(data).digest())
    digest.update(repr(list(views or [])).encode())
    return digest.hexdigest()[:32]


def _display_name(name: str, position: int) -> str:
    """The client's file name, reduced to a safe base name for messages (never used as a path)."""
    base = Path(str(name or "").replace("\\", "/")).name
    cleaned = "".join(c for c in base if c.isprintable())[:120]
    return cleaned or f"file {position + 1}"


def _dicom_header(path: Path) -> dict[str, str | None]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # read_image has already reported unreadable files; a header we cannot parse adds nothing
        return {}
    date = str(ds.get("StudyDate", "") or "").strip()
    return {"view": str(ds.get("ViewPosition", "") or "").strip() or None,
            "patient_id": str(ds.get("PatientID", "") or "").strip() or None,
            "study_date": f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else None}


def read_uploads(files: Sequence[tuple[str, bytes]], views: Sequence[str] | None = None, *, max_images: int = 4,
                 max_bytes: int = 100 << 20) -> UploadedStudy:
    """Decode the uploaded images of ONE study.

    Args:
        files: ``(client file name, bytes)`` per image.
        views: One view per image (``PA``, ``AP``, ``LATERAL``, ``LL``, ``OTHER`` or empty = from the DICOM header's
            ``ViewPosition``, else ``OTHER``).
        max_images: Most images per study.
        max_bytes: Most bytes of all images together.

    Raises:
        UploadError: No file, too many or too large files, a view list of the wrong length, or an image that
            :func:`rvl.data.io.read_image` cannot read (truncated DICOM, not an image, ...).
    """
    from rvl.constants import normalize_view
    from rvl.data.io import DICOM_SUFFIXES, ImageReadError, is_dicom_file, read_image

    if not files:
        raise UploadError("no image uploaded: send one or more files in the multipart field 'files'")
    if len(files) > max_images:
        raise UploadError(f"{len(files)} images uploaded; at most {max_images} per study", status=413)
    total = sum(len(data) for _, data in files)
    if total > max_bytes:
        raise UploadError(f"the upload holds {total / 2**20:.1f} MiB; at most {max_bytes / 2**20:.0f} MiB per study",
                          status=413)
    views = [v.strip() if isinstance(v, str) else "" for v in (views or [])]
    if views and len(views) != len(files):
        raise UploadError(f"{len(views)} views given for {len(files)} images; give one per image (empty = auto)")
    images = []
    # The files exist on disk only inside this folder, which is removed when decoding ends (also on errors).
    with tempfile.TemporaryDirectory(prefix="rvl-serve-upload-") as folder:
        for i, (name, data) in enumerate(files):
            shown = _display_name(name, i)
            if not data:
                raise UploadError(f"{shown}: empty file")
            suffix = Path(shown).suffix.lower()
            path = Path(folder) / f"upload{i}{suffix if suffix in IMAGE_SUFFIXES else ''}"
            path.write_bytes(data)
            try:
                image = read_image(path)
            except ImageReadError as err:
                raise UploadError(f"{shown}: {err.cause}") from None
            except Exception as err:  # Pillow's decompression-bomb guard and other decoder failures
                raise UploadError(f"{shown}: cannot read the image ({type(err).__name__}: {err})") from None
            header = _dicom_header(path) if path.suffix in DICOM_SUFFIXES or is_dicom_file(path) else {}
            view = views[i] if views and views[i] and views[i].upper() != "AUTO" else header.get("view")
            images.append(UploadedImage(shown, image, normalize_view(view), header.get("patient_id"),
                                        header.get("study_date")))
    patient = next((im.patient_id for im in images if im.patient_id), None)
    date = next((im.study_date for im in images if im.study_date), None)
    return UploadedStudy(images, upload_digest(files, views), patient, date, [im.view for im in images])
