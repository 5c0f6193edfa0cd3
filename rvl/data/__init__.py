"""Radiograph I/O, study manifests, the prepared image cache and the torch study dataset.

Light on import (PEP 562): ``import rvl.data`` loads numpy only; pydicom, pandas, datasets and torch are imported
when the name that needs them is first used.
"""
from __future__ import annotations

from rvl._lazy import lazy_attributes


# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "ImageReadError": "rvl.data.io",
    "read_image": "rvl.data.io",
    "to_square_uint8": "rvl.data.io",
    "ManifestError": "rvl.data.schema",
    "read_manifest": "rvl.data.manifest",
    "write_manifest": "rvl.data.manifest",
    "read_mimic_cxr_jpg": "rvl.data.converters",
    "read_iu_xray": "rvl.data.converters",
    "read_chexpert_csv": "rvl.data.converters",
    "read_dicom_folder": "rvl.data.dicom_folder",
    "PrepareError": "rvl.data.cache",
    "prepare": "rvl.data.cache",
    "load_cache": "rvl.data.cache_files",
    "read_cache_frame": "rvl.data.cache_files",
    "StudyDataset": "rvl.data.dataset",
    "collate_studies": "rvl.data.dataset",
    "default_image_transform": "rvl.data.dataset",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
