"""Face data: image reading, cropping/alignment, folder loading, crop cache, tfds lfw.

Every image is made by the test; nothing is downloaded.
"""

import math
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from tfadv.data import faces
from tfadv.data.faces import (
    BadImageError,
    Face,
    FaceSet,
    NoFaceError,
    crop_face,
    load_face,
    load_face_folder,
    read_image,
    to_dataset,
)


def _rgb(h=40, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path, array=None, mode=None, **save_kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(_rgb() if array is None else array)
    if mode is not None:
        img = img.convert(mode)
    img.save(path, **save_kwargs)
    return path


class CountingDetector:
    """Implements the detector interface; counts calls; finds no face in near-black images."""

    cache_key = "counting-v1"

    def __init__(self):
        self.calls = 0

    def detect_largest_face(self, image):
        self.calls += 1
        if image.max() < 10:
            return None
        h, w = image.shape[:2]
        return Face((w * 0.25, h * 0.25, w * 0.5, h * 0.5), 0.99,
                    {"left_eye": (w * 0.35, h * 0.4), "right_eye": (w * 0.65, h * 0.4)})


# --------------------------------------------------------------------------- read_image


def test_read_image_modes(tmp_path):
    rgb = _rgb()
    np.testing.assert_array_equal(read_image(_write(tmp_path / "rgb.png", rgb)), rgb)

    grey = read_image(_write(tmp_path / "grey.png", rgb, mode="L"))
    assert grey.shape == (40, 30, 3) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])

    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:10, :, 3] = 0  # transparent band -> white
    out = read_image(_write(tmp_path / "rgba.png", rgba))
    assert out.shape == (40, 30, 3)
    np.testing.assert_array_equal(out[:10], 255)
    np.testing.assert_array_equal(out[10:], rgb[10:])

    for mode, name in [("P", "palette.png"), ("CMYK", "cmyk.jpg"), ("1", "bw.png"),
                       ("LA", "greyalpha.png")]:
        out = read_image(_write(tmp_path / name, rgb, mode=mode))
        assert out.shape == (40, 30, 3) and out.dtype == np.uint8, mode

    grey16 = np.linspace(0, 65535, 40 * 30).reshape(40, 30).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    out = read_image(tmp_path / "grey16.png")
    assert out.shape == (40, 30, 3) and out.min() == 0 and out.max() == 255


def test_read_image_applies_exif_orientation(tmp_path):
    img = Image.fromarray(_rgb(20, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").shape == (50, 20, 3)


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation,stored", [
    (1, lambda a: a),
    (3, lambda a: np.rot90(a, 2)),
    (6, lambda a: np.rot90(a, 1)),  # stored turned left: display turns it 90 deg clockwise
    (8, lambda a: np.rot90(a, -1)),
    (2, lambda a: a[:, ::-1]),
])
def test_read_image_exif_orientation_gives_the_upright_pixels(tmp_path, orientation, stored):
    upright = _rgb(20, 50, seed=orientation)
    path = tmp_path / f"o{orientation}.png"  # lossless, so the pixels compare exactly
    pixels = np.ascontiguousarray(stored(upright))
    Image.fromarray(pixels).save(path, exif=_exif(orientation))
    np.testing.assert_array_equal(read_image(path), upright)
    jpeg = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(pixels).save(jpeg, quality=100, subsampling=0, exif=_exif(orientation))
    out = read_image(jpeg)
    assert out.shape == upright.shape
    assert np.abs(out.astype(int) - upright).mean() < 3  # JPEG noise, not a rotation


def test_read_image_composites_transparency_on_white(tmp_path):
    rgb = _rgb(8, 6, seed=1)
    alpha = np.array([0, 64, 128, 191, 255, 255], np.uint8)[None, :].repeat(8, axis=0)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    a = alpha[..., None] / 255.0
    want = np.rint(rgb * a + 255.0 * (1 - a))
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png"), want, atol=1)

    grey = rgb[..., 0]
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(read_image(tmp_path / "la.png")[..., 1],
                               np.rint(grey * a[..., 0] + 255.0 * (1 - a[..., 0])), atol=1)

    # A palette image whose entry 0 is transparent: those pixels are white, the rest exact.
    index = (np.arange(48).reshape(8, 6) % 4).astype(np.uint8)
    colours = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)
    pal = Image.fromarray(index, "P")
    pal.putpalette(colours.reshape(-1).tolist())
    pal.save(tmp_path / "pal.png", transparency=0)
    want = colours[index]
    want[index == 0] = 255
    np.testing.assert_array_equal(read_image(tmp_path / "pal.png"), want)
    pal.save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(read_image(tmp_path / "opaque.png"), colours[index])


def test_read_image_scales_16_bit_greyscale_by_its_white_level(tmp_path):
    grey16 = (np.arange(48).reshape(8, 6) * 1000 + 7).astype(np.uint16)  # 7 .. 47007
    want = np.repeat(np.rint(grey16 / 257.0).astype(np.uint8)[..., None], 3, axis=-1)
    for name in ("grey16.png", "grey16.tif", "grey16.pgm"):  # PIL: "I;16", "I;16", "I"
        Image.fromarray(grey16).save(tmp_path / name)
        np.testing.assert_array_equal(read_image(tmp_path / name), want, err_msg=name)
    # Dark 16-bit pixels stay dark (not stretched to the image's own maximum) ...
    dark = np.full((4, 4), 880, np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.pgm")
    np.testing.assert_array_equal(read_image(tmp_path / "dark.pgm"), 3)
    # ... and EXIF orientation applies to 16-bit images too.
    Image.fromarray(np.rot90(grey16, 1).copy()).save(tmp_path / "rot16.png", exif=_exif(6))
    np.testing.assert_array_equal(read_image(tmp_path / "rot16.png"), want)


def test_read_image_cmyk(tmp_path):
    rgb = _rgb(8, 6, seed=2)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tif")
    want = np.asarray(cmyk.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "cmyk.tif"), want)
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)  # CMYK JPEGs as print workflows write them
    out = read_image(tmp_path / "cmyk.jpg").astype(int)
    assert np.abs(out - want).mean() < 8


def test_read_image_errors(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(BadImageError, match="Could not decode"):
        read_image(tmp_path / "corrupt.jpg")
    good = _write(tmp_path / "good.jpg", _rgb(64, 64))
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    with pytest.raises(BadImageError):
        read_image(tmp_path / "truncated.jpg")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_image(tmp_path / "missing.png")
    assert issubclass(BadImageError, ValueError)


# --------------------------------------------------------------------------- crop_face


def test_crop_face_box_margin_and_border():
    image = _rgb(100, 80)
    # margin 0, output the size of the box: the exact pixels.
    out = crop_face(image, (10, 20, 32, 32), size=32, margin=0.0)
    np.testing.assert_array_equal(out, image[20:52, 10:42])
    # margin 0.5 on a 32 box: a 48 window, 8 px more on each side.
    out = crop_face(image, (10, 20, 32, 32), size=48, margin=0.5)
    np.testing.assert_array_equal(out, image[12:60, 2:50])
    # A window hanging over the top-left corner is padded with black.
    out = crop_face(image, (0, 0, 20, 20), size=40, margin=1.0)
    np.testing.assert_array_equal(out[:10, :10], 0)
    np.testing.assert_array_equal(out[10:, 10:], image[:30, :30])
    # float32 in [0, 255], and the non-square default stretches a tall box to a square.
    out = crop_face(image.astype(np.float32), (10, 10, 20, 40), size=16, dtype="float32")
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 255.0


def test_crop_face_square_window():
    image = np.zeros((100, 100, 3), np.uint8)
    image[:, 40:60] = 255  # a vertical band of the box's width
    tall = (40, 20, 20, 60)
    stretched = crop_face(image, tall, size=60, margin=0.0, square=False)
    squared = crop_face(image, tall, size=60, margin=0.0, square=True)
    assert stretched.min() == 255  # the band fills the stretched window
    assert squared[:, :10].max() == 0 and squared[:, 25:35].min() == 255  # band = middle third


@pytest.mark.parametrize("angle_deg", [-25.0, 0.0, 18.0])
def test_crop_face_align_levels_the_eyes(angle_deg):
    image = np.zeros((200, 200, 3), np.uint8)
    c, r, a = np.array([100.0, 100.0]), 30.0, math.radians(angle_deg)
    left = c - r * np.array([math.cos(a), math.sin(a)])
    right = c + r * np.array([math.cos(a), math.sin(a)])
    for (x, y), channel in [(left, 0), (right, 1)]:  # left eye red, right eye green
        image[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3, channel] = 255
    face = Face((60, 60, 80, 80), 1.0, {"left_eye": tuple(left), "right_eye": tuple(right)})
    out = crop_face(image, face, size=80, margin=0.0, align=True)
    ys_left, xs_left = np.nonzero(out[..., 0] > 100)
    ys_right, xs_right = np.nonzero(out[..., 1] > 100)
    assert abs(ys_left.mean() - ys_right.mean()) < 1.0
    assert xs_left.mean() < xs_right.mean()  # not mirrored
    assert abs((xs_right.mean() - xs_left.mean()) - 2 * r) < 2.0  # not rescaled
    assert abs(ys_left.mean() - 40) < 1.5  # rotated about the box centre


def test_crop_face_errors():
    image = _rgb()
    with pytest.raises(ValueError, match="keypoints"):
        crop_face(image, (0, 0, 10, 10), align=True)
    with pytest.raises(ValueError, match="margin"):
        crop_face(image, (0, 0, 10, 10), margin=-0.1)
    with pytest.raises(ValueError, match="positive width"):
        crop_face(image, (0, 0, 0, 10))
    with pytest.raises(ValueError, match="read_image"):
        crop_face(image[..., 0], (0, 0, 10, 10))


# --------------------------------------------------------------------------- folders


@pytest.fixture
def face_root(tmp_path):
    """alice: rgb jpg, grey png, rgba png, corrupt jpg, a text file; bob: 2 images;
    carol: empty; dave: only a corrupt file; plus a stray file at the root."""
    root = tmp_path / "faces"
    _write(root / "alice" / "1.jpg", _rgb(60, 50, 1))
    _write(root / "alice" / "2.png", _rgb(50, 60, 2), mode="L")
    rgba = np.dstack([_rgb(40, 40, 3), np.full((40, 40), 128, np.uint8)])
    _write(root / "alice" / "3.png", rgba)
    (root / "alice" / "4.jpg").write_bytes(b"garbage")
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / "alice" / ".hidden.jpg").write_bytes(b"ignored")
    _write(root / "bob" / "a.jpg", _rgb(30, 30, 4))
    _write(root / "bob" / "b.JPG", _rgb(80, 40, 5))
    (root / "carol").mkdir()
    (root / "dave").mkdir()
    (root / "dave" / "x.png").write_bytes(b"\x89PNG broken")
    (root / "stray.jpg").write_bytes(b"x")
    return root


def test_load_face_folder_without_detection(face_root, tmp_path):
    with pytest.warns(UserWarning, match="Skipped 2 identity folder"):
        fs = load_face_folder(face_root, size=24, detector="none", cache_dir=tmp_path / "c")
    assert isinstance(fs, FaceSet)
    assert fs.class_names == ["alice", "bob"]
    assert fs.images.shape == (5, 24, 24, 3) and fs.images.dtype == np.float32
    assert fs.images.min() >= 0 and fs.images.max() <= 255 and fs.images.max() > 1
    np.testing.assert_array_equal(fs.labels, [0, 0, 0, 1, 1])
    assert fs.labels.dtype == np.int64
    assert [os.path.basename(p) for p in fs.paths] == ["1.jpg", "2.png", "3.png", "a.jpg", "b.JPG"]
    counts = fs.counts()
    assert counts["images"] == 5 and counts["identities"] == 2
    assert counts["skipped_by_reason"] == {"unreadable image": 2, "not an image file": 1,
                                           "not in an identity folder": 1}
    assert counts["skipped_identities"] == 2
    assert {os.path.basename(p) for p, _ in fs.skipped_identities} == {"carol", "dave"}
    report = fs.report()
    assert "5 face images of 2 identities" in report and "4.jpg" in report
    # detector="none" takes the centre square: the greyscale image stays grey.
    np.testing.assert_array_equal(fs.images[1][..., 0], fs.images[1][..., 1])


def test_load_face_folder_min_images_and_class_names(face_root, tmp_path):
    with pytest.warns(UserWarning):
        fs = load_face_folder(face_root, size=8, detector="none", cache=False,
                              min_images_per_person=3)
    assert fs.class_names == ["alice"] and len(fs) == 3
    assert any("too few images" in r for _, r in fs.skipped)  # bob's two files
    with pytest.warns(UserWarning):
        fs = load_face_folder(face_root, size=8, detector="none", cache=False,
                              class_names=["zed", "bob", "alice"])
    assert fs.class_names == ["zed", "bob", "alice"]
    np.testing.assert_array_equal(fs.labels, [2, 2, 2, 1, 1])


def test_load_face_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="one sub-folder"):
        load_face_folder(tmp_path / "missing", detector="none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="sub-folder of photos per identity"):
        load_face_folder(tmp_path / "empty", detector="none")
    (tmp_path / "nofaces" / "p").mkdir(parents=True)
    (tmp_path / "nofaces" / "p" / "bad.jpg").write_bytes(b"nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="No usable face images"):
            load_face_folder(tmp_path / "nofaces", detector="none", cache=False)
    with pytest.raises(ValueError, match="detector="):
        load_face_folder(tmp_path / "nofaces", detector="haar")
    with pytest.raises(ValueError, match="align=True"):
        load_face_folder(tmp_path / "nofaces", detector="none", align=True)


def test_cache_avoids_second_detection(tmp_path):
    root = tmp_path / "faces"
    for i in range(3):
        _write(root / "p1" / f"{i}.png", _rgb(40, 40, i))
    _write(root / "p2" / "0.png", _rgb(40, 40, 9))
    _write(root / "p2" / "dark.png", np.zeros((40, 40, 3), np.uint8))  # no face
    cache = tmp_path / "cache"
    det = CountingDetector()
    first = load_face_folder(root, size=16, detector=det, cache_dir=cache, align=True)
    assert det.calls == 5 and len(first) == 4
    assert first.counts()["skipped_by_reason"] == {"no face found": 1}

    det2 = CountingDetector()
    second = load_face_folder(root, size=16, detector=det2, cache_dir=cache, align=True)
    assert det2.calls == 0  # crops and the no-face outcome both come from the cache
    np.testing.assert_array_equal(first.images, second.images)
    assert second.skipped == first.skipped

    # A changed file or a changed setting is recomputed.
    target = root / "p1" / "1.png"
    _write(target, _rgb(40, 40, 77))
    os.utime(target, ns=(10**18, 10**18))
    load_face_folder(root, size=16, detector=det2, cache_dir=cache, align=True)
    assert det2.calls == 1
    load_face_folder(root, size=16, detector=det2, cache_dir=cache, align=True, margin=0.4)
    assert det2.calls == 6
    load_face_folder(root, size=16, detector=det2, cache_dir=cache, align=True, cache=False)
    assert det2.calls == 11


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TFADV_CACHE_DIR", str(tmp_path / "tf"))
    assert faces.default_cache_dir() == tmp_path / "tf" / "crops"
    monkeypatch.delenv("TFADV_CACHE_DIR")
    assert str(faces.default_cache_dir()).endswith(os.path.join(".cache", "tfadv", "crops"))


def test_load_face_single_file(tmp_path):
    det = CountingDetector()
    crop = load_face(_write(tmp_path / "a.png", _rgb(40, 40)), size=20, detector=det, cache=False)
    assert crop.shape == (20, 20, 3) and crop.dtype == np.uint8
    with pytest.raises(NoFaceError):
        load_face(_write(tmp_path / "b.png", np.zeros((9, 9, 3), np.uint8)), detector=det,
                  cache=False)


def test_to_dataset(tmp_path):
    fs = FaceSet(np.arange(5 * 4 * 4 * 3, dtype=np.float32).reshape(5, 4, 4, 3),
                 np.arange(5, dtype=np.int64), list("abcde"), list("vwxyz"))
    batches = list(to_dataset(fs, 2).as_numpy_iterator())
    assert [b[0].shape for b in batches] == [(2, 4, 4, 3), (2, 4, 4, 3), (1, 4, 4, 3)]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(5))
    shuffled = np.concatenate([y for _, y in fs.to_dataset(5, shuffle=True, seed=3)])
    again = np.concatenate([y for _, y in fs.to_dataset(5, shuffle=True, seed=3)])
    np.testing.assert_array_equal(shuffled, again)
    assert sorted(shuffled) == list(range(5))
    with pytest.raises(ValueError, match="batch_size"):
        to_dataset(fs, 0)


# --------------------------------------------------------------------------- MTCNN


def test_mtcnn_counts_and_skips_images_without_faces(tmp_path):
    pytest.importorskip("mtcnn")
    root = tmp_path / "faces"
    _write(root / "p" / "flat.png", np.full((64, 64, 3), 90, np.uint8))
    _write(root / "p" / "noise.png", _rgb(64, 64))
    detector = faces.FaceDetector(min_face_size=20)
    assert detector.detect_largest_face(np.full((64, 64, 3), 90, np.uint8)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no face found: 2"):
            load_face_folder(root, detector=detector, cache_dir=tmp_path / "c")
    assert "mtcnn" in detector.cache_key


def test_detector_validation():
    with pytest.raises(ValueError, match="min_confidence"):
        faces.FaceDetector(min_confidence=2)
    with pytest.raises(ValueError, match="detect_largest_face"):
        load_face("x.png", detector=object())


# --------------------------------------------------------------------------- tfds lfw


def test_load_lfw_tfds_missing_says_how_to_prepare(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="tfds build lfw"):
        faces.load_lfw_tfds(data_dir=str(tmp_path))


def test_load_lfw_tfds_mock(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        ds, names = faces.load_lfw_tfds(data_dir=str(tmp_path), size=32)
        examples = list(ds.as_numpy_iterator())
    assert len(examples) == 4 and len(names) >= 1 and names == sorted(names)
    for image, label in examples:
        assert image.shape == (32, 32, 3) and image.dtype == np.float32
        assert 0 <= image.min() and image.max() <= 255
        assert 0 <= label < len(names)
