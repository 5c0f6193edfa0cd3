"""rvl.data.read_image on real chest radiographs (pydicom-data) and on files written here in each encoding."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rvl.data import ImageReadError, read_image
from rvl.data.io import box_to_square, to_square_uint8

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from rvl.bad_inputs import write_dicom  # noqa: E402,F401  (also imported from here by other test modules)


def chest_film(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} needs pydicom-data (pip install 'rvl-cxr[dicom]')")
    return path


def ramp(height: int = 32, width: int = 48, vmax: int = 4095, dtype=np.uint16) -> np.ndarray:
    return np.linspace(0, vmax, height * width).reshape(height, width).round().astype(dtype)


# ---------------------------------------------------------------------------------------- real chest radiographs
def test_monochrome1_chest_film_shows_dark_lungs_and_bright_mediastinum():
    image = read_image(chest_film("RG1_UNCR.dcm"))  # CR PA chest, MONOCHROME1, 15-bit, window 15000/30000
    assert image.dtype == np.float32 and image.shape == (1955, 1841)
    assert 0.0 <= image.min() < image.max() <= 1.0
    h, w = image.shape
    rows = slice(h // 4, 3 * h // 4)
    mediastinum = image[rows, int(w * 0.45):int(w * 0.55)].mean()
    right_lung = image[rows, int(w * 0.18):int(w * 0.33)].mean()
    left_lung = image[rows, int(w * 0.67):int(w * 0.82)].mean()
    assert mediastinum > right_lung + 0.1 and mediastinum > left_lung + 0.1
    # without the MONOCHROME1 inversion the same film would show bright lungs: the raw stored values say the opposite
    raw = pydicom.dcmread(chest_film("RG1_UNCR.dcm")).pixel_array.astype(np.float64)
    assert raw[rows, int(w * 0.45):int(w * 0.55)].mean() < raw[rows, int(w * 0.18):int(w * 0.33)].mean()


def test_jpeg2000_chest_film_decodes_to_the_uncompressed_pixels():
    uncompressed = read_image(chest_film("RG1_UNCR.dcm"))
    j2k = read_image(chest_film("RG1_J2KR.dcm"))  # JPEG 2000 lossless of the same film
    np.testing.assert_array_equal(j2k, uncompressed)


def test_missing_jpeg2000_decoder_names_the_dicom_extra(monkeypatch):
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import JPEG2000Lossless

    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg-openjpeg",)})
    path = chest_film("RG1_J2KR.dcm")
    with pytest.raises(ImageReadError, match=r"rvl-cxr\[dicom\]") as info:
        read_image(path)
    assert path in str(info.value) and "JPEG 2000" in str(info.value)


# ------------------------------------------------------------------------------------------- DICOM files written here
def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    pixels = ramp()
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2", bits_stored=12))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1", bits_stored=12))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono2[0, 0] < mono2[-1, -1]  # MONOCHROME2: high stored value = bright


def test_rescale_slope_then_window(tmp_path):
    pixels = ramp(vmax=4095)
    slope, intercept, center, width = 2.0, -1000.0, 3000.0, 2000.0
    image = read_image(write_dicom(tmp_path / "w.dcm", pixels, bits_stored=12, rescale=(slope, intercept),
                                   window=(center, width)))
    # DICOM PS3.3 C.11.2.1.2 linear window on the rescaled values; output range = rescaled 12-bit range
    values = pixels * slope + intercept
    y_min, y_max = intercept, 4095 * slope + intercept
    expected = np.clip(((values - (center - 0.5)) / (width - 1) + 0.5), 0, 1)
    expected = (expected * (y_max - y_min) + y_min - y_min) / (y_max - y_min)
    np.testing.assert_allclose(image, expected, atol=1e-3)
    assert image.min() == 0.0 and image.max() == 1.0  # the window clips both ends of this ramp


def test_16bit_without_window_uses_robust_min_max(tmp_path):
    pixels = ramp(64, 64, vmax=65535)
    pixels[0, 0], pixels[0, 1] = 65535, 0  # a hot and a dead pixel must not set the contrast
    image = read_image(write_dicom(tmp_path / "p.dcm", pixels, bits_stored=16))
    lo, hi = np.percentile(pixels.astype(np.float64), (0.5, 99.5))
    np.testing.assert_allclose(image, np.clip((pixels - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_modality_lut_sequence_is_applied(tmp_path):
    pixels = ramp(16, 16, vmax=255, dtype=np.uint16)
    lut = [i * i for i in range(256)]  # non-linear LUT: a linear rescale would put the middle at 0.5
    image = read_image(write_dicom(tmp_path / "lut.dcm", pixels, bits_stored=8, modality_lut=(0, lut)))
    mapped = np.asarray(lut, dtype=np.float64)[pixels]
    lo, hi = np.percentile(mapped, (0.5, 99.5))
    np.testing.assert_allclose(image, np.clip((mapped - lo) / (hi - lo), 0, 1), atol=1e-5)
    middle = image.ravel()[pixels.ravel() == 128][0]
    assert middle < 0.3


def test_pydicom_modality_lut_fixture():
    path = chest_film("mlut_18.dcm")  # signed 12-bit with a 4096-entry Modality LUT Sequence
    ds = pydicom.dcmread(path)
    descriptor, data = ds.ModalityLUTSequence[0].LUTDescriptor, np.asarray(ds.ModalityLUTSequence[0].LUTData)
    mapped = data[np.clip(ds.pixel_array.astype(np.int64) - descriptor[1], 0, descriptor[0] - 1)].astype(np.float64)
    lo, hi = np.percentile(mapped, (0.5, 99.5))
    np.testing.assert_allclose(read_image(path), np.clip((mapped - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_multiframe_uses_first_frame_with_warning(tmp_path):
    frames = np.stack([ramp(), ramp()[::-1], ramp()[:, ::-1]])
    path = write_dicom(tmp_path / "mf.dcm", frames, bits_stored=12, frames=True)
    with pytest.warns(UserWarning, match="first"):
        image = read_image(path)
    single = read_image(write_dicom(tmp_path / "f0.dcm", frames[0], bits_stored=12))
    np.testing.assert_allclose(image, single)


def test_rgb_dicom_becomes_luminance(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :2, 0], rgb[:, 2:4, 1], rgb[:, 4:, 2] = 255, 255, 255
    image = read_image(write_dicom(tmp_path / "rgb.dcm", rgb))
    np.testing.assert_allclose(image[0, [0, 2, 4]], [0.299, 0.587, 0.114], atol=1e-3)


# ------------------------------------------------------------------------------------------------ Pillow formats
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_8_and_16_bit_pillow_images(tmp_path, suffix):
    eight = ramp(20, 30, vmax=255, dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / f"a8{suffix}")
    np.testing.assert_allclose(read_image(tmp_path / f"a8{suffix}"), eight / 255.0, atol=1e-6)
    sixteen = ramp(20, 30, vmax=65535)
    Image.fromarray(sixteen).save(tmp_path / f"a16{suffix}")
    np.testing.assert_allclose(read_image(tmp_path / f"a16{suffix}"), sixteen / 65535.0, atol=1e-6)
    twelve = ramp(20, 30, vmax=4000)  # 12-bit detector data in a 16-bit container: scaled by 4095, not 65535
    Image.fromarray(twelve).save(tmp_path / f"a12{suffix}")
    np.testing.assert_allclose(read_image(tmp_path / f"a12{suffix}"), twelve / 4095.0, atol=1e-6)


def test_jpeg_and_rgb_png(tmp_path):
    gray = ramp(40, 40, vmax=255, dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    assert np.abs(read_image(tmp_path / "g.jpg") - gray / 255.0).mean() < 0.01
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3, 0], rgb[:, 3:, 1] = 200, 100
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image = read_image(tmp_path / "c.png")
    assert image.ndim == 2
    np.testing.assert_allclose(image[0, [0, 3]], [round(200 * 0.299) / 255, round(100 * 0.587) / 255], atol=2 / 255)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_files_raise_image_read_error_naming_path_and_cause(tmp_path):
    cases = {}
    cases["missing.png"] = "not found"
    (tmp_path / "text.png").write_text("this is not an image")
    cases["text.png"] = "not an image"
    (tmp_path / "text.dcm").write_text("this is not DICOM either")
    cases["text.dcm"] = "not a valid DICOM"
    film = Path(chest_film("RG1_UNCR.dcm")).read_bytes()
    (tmp_path / "truncated_pixels.dcm").write_bytes(film[: len(film) // 2])
    cases["truncated_pixels.dcm"] = "truncated or corrupt"
    (tmp_path / "truncated_header.dcm").write_bytes(film[:300])
    cases["truncated_header.dcm"] = "truncated or corrupt"
    report = pydicom.dcmread(write_dicom(tmp_path / "no_pixels.dcm", ramp(), pixel_data=False))
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(report, keyword)
    report.Modality = "SR"  # a structured report: a DICOM file with no image at all
    report.save_as(tmp_path / "no_pixels.dcm")
    cases["no_pixels.dcm"] = "no pixel data"
    write_dicom(tmp_path / "pixels_cut_off.dcm", ramp(), pixel_data=False)  # image module but no PixelData element
    cases["pixels_cut_off.dcm"] = "truncated or corrupt"
    from pydicom.encaps import encapsulate

    mpeg = write_dicom(tmp_path / "mpeg2.dcm", ramp(), pixel_data=False, transfer_syntax="1.2.840.10008.1.2.4.100")
    ds = pydicom.dcmread(mpeg)
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(mpeg)
    cases["mpeg2.dcm"] = "unsupported transfer syntax"
    Image.fromarray(ramp(64, 64, 255, np.uint8)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:80])
    cases["cut.png"] = "truncated or corrupt"
    for name, cause in cases.items():
        with pytest.raises(ImageReadError, match=cause) as info:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
        assert isinstance(info.value, ValueError)


def test_dicom_without_suffix_is_detected_by_magic(tmp_path):
    path = write_dicom(tmp_path / "IM0001.dcm", ramp(), bits_stored=12)
    shutil.move(path, tmp_path / "IM0001")
    np.testing.assert_allclose(read_image(tmp_path / "IM0001"), read_image(write_dicom(tmp_path / "b.dcm", ramp(),
                                                                                         bits_stored=12)))


# ------------------------------------------------------------------------------------------ square resize and boxes
def test_square_resize_keeps_aspect_pads_and_maps_boxes():
    image = np.zeros((100, 50), np.float32)
    box = [0.2, 0.5, 0.6, 0.7]  # normalised x0, y0, x1, y1 of a bright rectangle
    image[50:70, 10:30] = 1.0
    square = to_square_uint8(image, 64)
    assert square.shape == (64, 64) and square.dtype == np.uint8
    columns = np.flatnonzero(to_square_uint8(np.ones_like(image), 64).max(axis=0))
    assert (columns[0], columns[-1]) == (16, 47)  # 32 px wide content centred in 64
    x0, y0, x1, y1 = box_to_square(box, 100, 50, 64)
    ys, xs = np.nonzero(square > 127)
    assert abs(xs.min() / 64 - x0) < 2 / 64 and abs((xs.max() + 1) / 64 - x1) < 2 / 64
    assert abs(ys.min() / 64 - y0) < 2 / 64 and abs((ys.max() + 1) / 64 - y1) < 2 / 64
