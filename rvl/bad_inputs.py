"""A corpus of bad inputs for every reader and CLI entry of rvl, and the harness that feeds them in.

Used by ``tests/test_fuzz.py`` (a fast subset) and ``bench/fault_matrix.py`` (all of it). Each :class:`Case` is a file
that a user could hand to rvl by mistake (zero-byte / truncated / random files under image extensions, DICOMs that
are odd or hostile, broken manifests, report files in other encodings or shapes) with what must happen: ``error``
(refused: exit 2 and a message naming the file or row, never a traceback), ``ok`` (an unusual but valid input that
must work), ``degenerate`` (readable, but refused for zero-shot). :mod:`rvl.bad_inputs_run` feeds them to the
readers and commands and judges the outcome.
"""
from __future__ import annotations

import io
import json
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = ["Case", "build_corpus", "image_cases", "manifest_cases", "report_cases", "write_dicom", "good_images"]

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".bmp", ".dcm")


@dataclass
class Case:
    """One bad input: ``expect`` is error / ok / degenerate; ``token`` must appear in the error message."""

    name: str
    kind: str  # image | manifest | reports
    path: Path
    expect: str
    token: str = ""
    rows: int | None = None  # reports: records the output must keep


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                window: tuple[float, float] | None = None, rescale: tuple[float, float] | None = None,
                modality_lut: tuple[int, list[int]] | None = None, frames: bool = False, pixel_data: bool = True,
                transfer_syntax: str = ExplicitVRLittleEndian, **tags) -> Path:
    """Write a DX DICOM file from an array (uint8/uint16/int16; (F,H,W) when ``frames``; (H,W,3) uint8 = RGB)."""
    arr = np.asarray(pixels)
    rgb = arr.ndim == 3 and not frames
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX_STORAGE, generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "DX", "P1", generate_uid(), generate_uid()
    ds.Rows, ds.Columns = arr.shape[-3:-1] if rgb else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(arr.dtype.kind == "i")
    if frames:
        ds.NumberOfFrames = arr.shape[0]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if modality_lut is not None:
        first, data = modality_lut
        item = Dataset()
        item.add_new(0x00283002, "US", [len(data), first, 16])
        item.ModalityLUTType = "US"
        item.add_new(0x00283006, "US", data)
        ds.ModalityLUTSequence = [item]
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixel_data:
        ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(height: int = 48, width: int = 64, vmax: int = 4095, dtype=np.uint16) -> np.ndarray:
    return np.linspace(0, vmax, height * width).reshape(height, width).round().astype(dtype)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG signature + IHDR chunk (valid CRC) announcing ``width`` x ``height``, then a tiny IDAT and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def good_images(root: Path) -> list[Path]:
    """Three valid radiograph-like files (PNG, JPEG, DICOM) that the bad manifests point at."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    texture = (ramp(64, 64, 255, np.uint8) // 2 + rng.integers(0, 100, (64, 64), dtype=np.uint8)).astype(np.uint8)
    Image.fromarray(texture).save(root / "good.png")
    Image.fromarray(texture).save(root / "good.jpg", quality=95)
    write_dicom(root / "good.dcm", ramp(64, 64), bits_stored=12)
    return [root / "good.png", root / "good.jpg", root / "good.dcm"]


def image_cases(root: Path, full: bool = False) -> list[Case]:
    """Bad and odd image files: every unreadable one must be refused naming the file (or skipped and counted)."""
    import pydicom
    from pydicom.encaps import encapsulate

    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    good = good_images(root / "good")

    def add(name: str, data: bytes | None, expect: str = "error") -> None:
        path = root / name
        if data is None:
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(data)
        cases.append(Case(f"image:{name}", "image", path, expect, name))

    sources = {".png": good[0].read_bytes(), ".jpg": good[1].read_bytes(), ".dcm": good[2].read_bytes()}
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(good[0]).save(buffer, format="TIFF")
    sources[".tif"] = buffer.getvalue()
    seeds = range(8) if full else range(1)  # random files of 2 to 5.5 kB
    for suffix in IMAGE_SUFFIXES:
        add(f"zero{suffix}", b"")
        for seed in seeds:
            add(f"random{seed}{suffix}", random.Random(seed).randbytes(2048 + 512 * seed))
        if suffix in sources:
            data = sources[suffix]
            add(f"truncated{suffix}", data[:len(data) // 2])
            if full:
                add(f"header_only{suffix}", data[:64])
                add(f"magic_then_noise{suffix}", data[:8] + random.Random(9).randbytes(len(data) - 8))
                for share in (10, 90):  # cut early (headers only) and late (the last rows of pixels missing)
                    add(f"truncated{share}{suffix}", data[:len(data) * share // 100])
    if full:  # the same damage under upper-case names (PACS exports) and as larger random files
        for suffix in (".PNG", ".JPG", ".DCM", ".TIFF"):
            add(f"zero_upper{suffix}", b"")
            add(f"random_upper{suffix}", random.Random(11).randbytes(3000))
            data = sources[suffix.lower().replace(".tiff", ".tif")]
            add(f"truncated_upper{suffix}", data[:len(data) // 3])
        for suffix in IMAGE_SUFFIXES:
            add(f"random_large{suffix}", random.Random(12).randbytes(65536))
    add("text.png", b"this is not an image, it is a note")
    add("folder.png", None)
    add("bomb.png", _png_claiming(30000, 30000))
    # DICOM: hostile or broken
    add("bomb.dcm", _dicom_bytes(root / "tmp.dcm", np.zeros((4, 4), np.uint16), Rows=30000, Columns=30000))
    add("no_pixels.dcm", _dicom_bytes(root / "tmp.dcm", ramp(), pixel_data=False))
    sr = pydicom.dcmread(write_dicom(root / "tmp.dcm", ramp(), pixel_data=False))
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(sr, keyword)
    sr.Modality = "SR"
    sr.save_as(root / "structured_report.dcm")
    cases.append(Case("image:structured_report.dcm", "image", root / "structured_report.dcm", "error",
                      "structured_report.dcm"))
    wrong = pydicom.dcmread(write_dicom(root / "wrong_syntax.dcm", ramp(), pixel_data=False,
                                        transfer_syntax="1.2.840.10008.1.2.4.100"))
    wrong.PixelData = encapsulate([b"\x00" * 64])
    wrong["PixelData"].VR = "OB"
    wrong.save_as(root / "wrong_syntax.dcm")
    cases.append(Case("image:wrong_syntax.dcm", "image", root / "wrong_syntax.dcm", "error", "wrong_syntax.dcm"))
    jpeg_claim = pydicom.dcmread(write_dicom(root / "jpeg_claim.dcm", ramp(), pixel_data=False,
                                             transfer_syntax="1.2.840.10008.1.2.4.50"))
    jpeg_claim.PixelData = encapsulate([ramp().tobytes()[:512]])  # JPEG baseline announced, raw bytes inside
    jpeg_claim["PixelData"].VR = "OB"
    jpeg_claim.save_as(root / "jpeg_claim.dcm")
    cases.append(Case("image:jpeg_claim.dcm", "image", root / "jpeg_claim.dcm", "error", "jpeg_claim.dcm"))
    add("short_pixels.dcm", _dicom_bytes(root / "tmp.dcm", ramp(8, 8), Rows=48, Columns=64))
    add("dicm_then_noise.dcm", b"\x00" * 128 + b"DICM" + random.Random(3).randbytes(1500))
    # DICOM: odd but valid (must read) or degenerate (must be refused for zero-shot)
    add("one_pixel.dcm", _dicom_bytes(root / "tmp.dcm", np.array([[700]], np.uint16), bits_stored=12), "degenerate")
    add("flat.dcm", _dicom_bytes(root / "tmp.dcm", np.full((64, 64), 900, np.uint16), bits_stored=12), "degenerate")
    add("sixteen_bit_no_voi.dcm", _dicom_bytes(root / "tmp.dcm", ramp(64, 64, 65535)), "ok")
    rgb = np.stack([ramp(64, 64, 255, np.uint8)] * 3, axis=-1)
    add("rgb.dcm", _dicom_bytes(root / "tmp.dcm", rgb), "ok")
    frames = np.stack([ramp(64, 64), ramp(64, 64)[::-1]])
    add("multi_frame.dcm", _dicom_bytes(root / "tmp.dcm", frames, bits_stored=12, frames=True), "ok")
    add("monochrome1.dcm", _dicom_bytes(root / "tmp.dcm", ramp(64, 64), "MONOCHROME1", bits_stored=12), "ok")
    (root / "tmp.dcm").unlink(missing_ok=True)
    return cases


def _dicom_bytes(path: Path, pixels: np.ndarray, *args: Any, **kwargs: Any) -> bytes:
    return write_dicom(path, pixels, *args, **kwargs).read_bytes()


def manifest_cases(root: Path, full: bool = False) -> list[Case]:
    """Broken study manifests, each pointing at valid images so that only the manifest problem can trigger."""
    from rvl.constants import CHEXPERT_LABELS

    root.mkdir(parents=True, exist_ok=True)
    images = [p.name for p in good_images(root)]
    base = pd.DataFrame({"patient_id": ["p1", "p2", "p3"], "study_id": ["s1", "s2", "s3"],
                         "image_paths": [[images[0]], [images[1]], [images[2], images[0]]],
                         "view_positions": [["PA"], ["AP"], ["PA", "LATERAL"]],
                         "report": ["FINDINGS: clear.", "IMPRESSION: effusion.", "No acute process."],
                         **{label: [1.0, 0.0, np.nan] for label in CHEXPERT_LABELS}})
    cases: list[Case] = []

    def add(name: str, frame: pd.DataFrame | None, token: str, expect: str = "error", raw: bytes | None = None):
        path = root / name
        if raw is not None:
            path.write_bytes(raw)
        elif name.endswith(".parquet"):
            frame.to_parquet(path)
        elif name.endswith(".jsonl"):
            frame.to_json(path, orient="records", lines=True)
        else:
            as_json = {c: [json.dumps(list(v)) for v in frame[c]] for c in ("image_paths", "view_positions")}
            frame.assign(**as_json).to_csv(path, index=False)
        cases.append(Case(f"manifest:{name}", "manifest", path, expect, token))

    add("no_image_column.parquet", base.drop(columns=["image_paths"]), "missing required column")
    add("no_study_id.csv", base.drop(columns=["study_id"]), "missing required column")
    add("duplicate_ids.parquet", base.assign(study_id=["s1", "s2", "s1"]), "rows [0, 2]")
    outside = [[images[0]], ["../../no/such/folder/pa.png"], [images[2]]]  # climbs out of the folder, to nothing
    add("outside_root.parquet", base.assign(image_paths=outside), "row 1")
    add("nan_labels.parquet", base.assign(**{label: np.nan for label in CHEXPERT_LABELS}), "", "ok")
    add("text_label.csv", base.assign(Edema=["yes", "0", ""]), "row 0")
    add("label_two.parquet", base.assign(Edema=[1.0, 2.0, 0.0]), "row 1")
    add("label_inf.parquet", base.assign(Atelectasis=[np.inf, 0.0, 1.0]), "row 0")
    add("list_in_report.parquet", base.assign(report=[["a", "b"], ["c"], ["d"]]), "row 0")
    add("list_in_label.jsonl", base.assign(Edema=[[1.0], [0.0], [1.0]]), "row 0")
    add("list_in_study_id.parquet", base.assign(study_id=[["s1"], ["s2"], ["s3"]]), "row 0")
    add("paths_not_list.parquet", base.assign(image_paths=[7, 8, 9]), "row 0")
    add("views_mismatch.parquet", base.assign(view_positions=[["PA", "AP"], ["AP"], ["PA", "LATERAL"]]), "row 0")
    add("empty_paths.parquet", base.assign(image_paths=[[], [images[1]], [images[2]]]), "row 0")
    add("empty.csv", None, "empty.csv", raw=b"")
    add("random.parquet", None, "random.parquet", raw=random.Random(1).randbytes(4096))
    add("truncated.parquet", None, "truncated.parquet", raw=_parquet_bytes(base)[:300])
    add("broken.jsonl", None, "broken.jsonl", raw=b'{"patient_id": "p1", "study_id": "s1", "image_paths": ["good.p\n')
    add("utf16.csv", None, "utf16.csv", raw=base.to_csv(index=False).encode("utf-16"))
    if full:
        add("missing_patient.parquet", base.assign(patient_id=["p1", None, "p3"]), "row 1")
        add("label_half.csv", base.assign(Edema=[0.5, 1, 0]), "row 0")
        add("dict_in_split.jsonl", base.assign(split=[{"a": 1}, "train", "test"]), "row 0")
        add("no_header.csv", None, "no_header.csv", raw=b"p1,s1,good.png,PA,report\n")
        add("binary.csv", None, "binary.csv", raw=random.Random(5).randbytes(3000))
        add("label_minus_two.parquet", base.assign(Edema=[-2.0, 0.0, 1.0]), "row 0")
        add("nan_study_id.parquet", base.assign(study_id=["s1", None, "s3"]), "row 1")
        add("broken_json_paths.csv", base.assign(image_paths=['["a.png"', "[]", "[1,"]), "row")
        add("zero.parquet", None, "zero.parquet", raw=b"")
        add("zero.jsonl", None, "zero.jsonl", raw=b"")
        add("random.jsonl", None, "random.jsonl", raw=random.Random(8).randbytes(2048))
        add("only_header.csv", None, "only_header.csv", raw=b"patient_id,study_id,image_paths\n")
        # a manifest may list a file that is gone: prepare skips and counts it, strict refuses
        gone = [["no_such.png"], [images[1]], [images[2], images[0]]]
        add("missing_image_file.parquet", base.assign(image_paths=gone), "", "ok")
    return cases


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return buffer.getvalue()


def report_cases(root: Path, full: bool = False) -> list[Case]:
    """Report files for ``rvl label``: odd encodings and shapes must label every record; unreadable ones are refused."""
    root.mkdir(parents=True, exist_ok=True)
    reports = ["FINDINGS: No pneumothorax. IMPRESSION: Small left effusion.", "Normal chest. Café au lait.",
               "Mild cardiomegaly, no edema."]
    csv_text = "report\n" + "".join(f'"{r}"\n' for r in reports)
    cases: list[Case] = []

    def add(name: str, data: bytes, expect: str = "ok", rows: int | None = len(reports), token: str = "") -> None:
        (root / name).write_bytes(data)
        cases.append(Case(f"reports:{name}", "reports", root / name, expect, token or name, rows))

    add("latin1.csv", csv_text.encode("latin-1"))
    add("cp1252.csv", (csv_text + '"smart \u2019quotes\u2019"\n').encode("cp1252"), rows=4)
    add("utf8_bom.csv", csv_text.encode("utf-8-sig"))
    add("utf16_bom.csv", csv_text.encode("utf-16"))
    add("utf16_no_bom.csv", csv_text.encode("utf-16-le"), "error", None)
    add("nul_bytes.csv", csv_text.replace("Normal", "Nor\x00mal").encode())
    add("ten_mb_cell.csv", ("report\n\"" + "effusion " * (10 * 1024 * 1024 // 9) + "\"\nnormal\n").encode(), rows=2)
    add("no_header.csv", "".join(f'"{r}"\n' for r in reports).encode())
    add("no_header_two_columns.csv", "".join(f'"{r}",x\n' for r in reports).encode(), "error", None)
    add("empty.csv", b"", rows=0)
    add("binary.csv", random.Random(4).randbytes(5000), "error", None)
    add("unterminated_quote.csv", b'report\n"never closed\nnormal\n', "error", None)
    add("random.parquet", random.Random(6).randbytes(3000), "error", None)
    add("broken_lines.jsonl", b'{"report": "No effusion."}\n{"report": broken\n{"report": "Edema."}\n', rows=3)
    add("utf16.jsonl", '{"report": "No effusion."}\n'.encode("utf-16"), "error", None)
    if full:
        add("crlf.csv", csv_text.replace("\n", "\r\n").encode())
        add("only_header.csv", b"report\n", rows=0)
        add("truncated.parquet", _parquet_bytes(pd.DataFrame({"report": reports}))[:200], "error", None)
        add("one_column_other_name.csv", b"text\nNo effusion.\n", rows=2)  # read as headerless: both lines labelled
        add("whitespace_reports.csv", b'report\n"   "\n""\n"No effusion."\n', rows=3)
        add("gzip.jsonl.gz", __import__("gzip").compress(b'{"report": "No effusion."}\n{"report": "Edema."}\n'),
            rows=2)
        add("zero.parquet", b"", "error", None)
    return cases


def build_corpus(root: Path, full: bool = False) -> list[Case]:
    """Every case, written under ``root`` (images/, manifests/, reports/)."""
    return [*image_cases(root / "images", full), *manifest_cases(root / "manifests", full),
            *report_cases(root / "reports", full)]
