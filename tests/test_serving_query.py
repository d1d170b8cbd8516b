"""`tfadv query` and `Client.embed_files` read and crop photos as `tfadv facenet embed` does."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from test_export import save_embedder
from tfadv.cli import main
from tfadv.data.faces import Face, load_face
from tfadv.export import export_model
from tfadv.serving import Client, ModelServer

NAME = "faces"
SQ = 16  # face crops are square


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    model, path = save_embedder(str(root / "model"), size=(SQ, SQ), seed=6)
    base = str(root / "base")
    export_model(path, base, name=NAME)
    server = ModelServer(base, name=NAME, port=0, rest_port=None, poll_interval=0,
                         warmup=False).start()
    yield model, path, server
    server.stop()


@pytest.fixture(autouse=True)
def _crop_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFADV_CACHE_DIR", str(tmp_path / "cache"))


def _photo(seed=0, h=40, w=30):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _photos(tmp_path):
    """Files in awkward modes, each with the upright RGB pixels it must decode to."""
    rgb = _photo()
    files = {}
    Image.fromarray(rgb).save(tmp_path / "upright.png")
    files["upright.png"] = rgb
    # Stored sideways, displayed upright: orientation 6 = turn 90 degrees clockwise.
    Image.fromarray(np.rot90(rgb, 1).copy()).save(tmp_path / "exif6.png", exif=_exif(6))
    files["exif6.png"] = rgb
    Image.fromarray(np.rot90(rgb, -1).copy()).save(tmp_path / "exif8.png", exif=_exif(8))
    files["exif8.png"] = rgb
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :10] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "alpha.png")
    on_white = rgb.copy()
    on_white[:, :10] = 255
    files["alpha.png"] = on_white
    grey = rgb[..., 0]
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    files["grey16.png"] = np.repeat(grey[..., None], 3, axis=-1)
    return {str(tmp_path / k): v for k, v in files.items()}


def _query(capsys, server, *args):
    """(exit code, one JSON object per image, stderr) of `tfadv query --json`."""
    code = main(["query", server.grpc_target, "--name", NAME, "--json", *map(str, args)])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def _centre_crop(rgb):
    """What `--no-crop` feeds the model: the centre square, resized (as detector='none')."""
    import cv2

    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return cv2.resize(rgb[top:top + side, left:left + side], (SQ, SQ),
                      interpolation=cv2.INTER_AREA)


def test_query_and_facenet_embed_agree_on_images_that_are_already_crops(square, tmp_path,
                                                                        capsys):
    model, path, server = square
    files = _photos(tmp_path)
    code, queried, _ = _query(capsys, server, "--no-crop", *files)
    assert code == 0
    assert main(["facenet", "embed", "--model", path, "--no-crop", "--json", *files]) == 0
    embedded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["path"] for r in queried] == [r["path"] for r in embedded] == list(files)
    for q, e, rgb in zip(queried, embedded, files.values()):
        # Both equal the model on the upright, white-backed, 8-bit pixels of the file.
        want = model(_centre_crop(rgb)[None].astype("float32")).numpy()[0]
        np.testing.assert_allclose(q["embedding"], want, atol=1e-5, err_msg=q["path"])
        np.testing.assert_allclose(e["embedding"], want, atol=1e-5, err_msg=e["path"])


class BoxDetector:
    """The detector interface with a fixed box: the face is the photo's top-left quarter."""

    cache_key = "box-detector-v1"

    def __init__(self):
        self.calls = 0

    def detect_largest_face(self, image):
        self.calls += 1
        h, w = image.shape[:2]
        return Face((0, 0, w / 2, h / 2), 0.99)


def test_embed_files_crops_the_face_like_facenet_embed(square, tmp_path):
    from tfadv.recipes.facenet import embed_files

    model, path, server = square
    files = list(_photos(tmp_path))
    detector = BoxDetector()
    with Client(server.grpc_target, name=NAME) as client:
        got = client.embed_files(files, detector=detector, cache=False)
    assert detector.calls == len(files)
    local = embed_files(files, model=path, detector=BoxDetector())
    for g, e, f in zip(got, local, files):
        crop = load_face(f, size=SQ, detector=BoxDetector(), cache=False)
        want = model(crop[None].astype("float32")).numpy()[0]
        np.testing.assert_allclose(g["embedding"], want, atol=1e-5)
        np.testing.assert_allclose(e["embedding"], want, atol=1e-5)
    # The EXIF-rotated copies are cropped from the upright picture, so they agree too.
    np.testing.assert_allclose(got[1]["embedding"], got[0]["embedding"], atol=1e-5)
    np.testing.assert_allclose(got[2]["embedding"], got[0]["embedding"], atol=1e-5)


def test_query_errors(square, tmp_path, capsys):
    model, _, server = square
    good = tmp_path / "good.png"
    Image.fromarray(_photo()).save(good)
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    code, lines, err = _query(capsys, server, "--no-crop", good, bad, tmp_path / "missing.jpg")
    assert code == 2
    assert "embedding" in lines[0]
    assert "Could not decode" in lines[1]["error"] and "not found" in lines[2]["error"]
    assert "2 of 3 images could not be read" in err
    pytest.importorskip("mtcnn")
    code, lines, _ = _query(capsys, server, good)  # cropping is the default: noise has no face
    assert code == 2 and "no face found" in lines[0]["error"]
    assert main(["query", server.grpc_target, "--name", "nobody", str(good)]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    with Client(server.grpc_target, name=NAME) as client:
        with pytest.raises(ValueError, match="not both"):
            client.embed_files([good], crop=False, detector=BoxDetector())
        client._metadata = {"image_size": (24, 20)}
        with pytest.raises(ValueError, match="square"):
            client.embed_files([good])


def _cosine(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.slow
def test_query_equals_facenet_embed_on_a_real_face_upright_and_exif_rotated(tmp_path, capsys,
                                                                            monkeypatch):
    from tfadv import assets
    from tfadv.recipes.facenet import pretrained

    monkeypatch.delenv("TFADV_CACHE_DIR")
    got = assets.fetch(quiet=True)  # the cache; the first run on a machine downloads it
    photo = sorted((got.demo_faces / "val" / "madonna").glob("*.jpg"))[0]
    # A fresh crop cache next to the fetched weights, so each command crops on its own.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / got.weights.parent.name).symlink_to(got.weights.parent, target_is_directory=True)
    monkeypatch.setenv("TFADV_CACHE_DIR", str(cache))
    crops = cache / "crops"
    # A phone stores the picture sideways and says so in EXIF (6: turn 90 degrees clockwise).
    with Image.open(photo) as img:
        upright = np.asarray(img.convert("RGB"))
    rotated = tmp_path / "phone.jpg"
    Image.fromarray(np.rot90(upright, 1).copy()).save(rotated, quality=100, subsampling=0,
                                                      exif=_exif(6))

    base = tmp_path / "serving"
    export_model(pretrained("facenet-mscele1m-128"), str(base), name="facenet", threshold=0.5)
    with ModelServer(str(base), name="facenet", port=0, rest_port=None, poll_interval=0,
                     warmup=False) as server:
        assert main(["query", server.grpc_target, "--name", "facenet", "--json",
                     str(photo), str(rotated)]) == 0
    queried = [json.loads(line)["embedding"] for line in capsys.readouterr().out.splitlines()]
    shutil.rmtree(crops, ignore_errors=True)  # `facenet embed` crops the photos again
    assert main(["facenet", "embed", "--json", str(photo), str(rotated)]) == 0
    embedded = [r["embedding"]
                for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])]
    for q in queried:
        for e in embedded:
            assert _cosine(q, e) > 0.99
    assert _cosine(queried[0], embedded[0]) > 0.9999  # the same file: the same embedding
