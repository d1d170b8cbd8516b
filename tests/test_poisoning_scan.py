"""`tfadv poison scan` and `facenet finetune --scan-poison`: planted photos are found, files
are never touched."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

import keras

SIZE = 16


def colour_embedder():
    """Embeds a photo as its unit mean colour (a Dense layer to fine-tune): identities of
    distinct colours are separated, as a face model separates people."""
    inputs = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.GlobalAveragePooling2D()(inputs)
    h = keras.layers.Dense(3, kernel_initializer="identity", name="dense")(h)
    return keras.Model(inputs, keras.layers.UnitNormalization()(h))


@pytest.fixture
def planted_folder(tmp_path):
    """3 identities of distinct colours, 24 photos each; person0's folder also holds 4 photos
    that look like person2 (planted under person0's name)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    colour = {0: (200, 40, 40), 1: (40, 200, 40), 2: (40, 40, 200)}
    for person in range(3):
        d = root / f"person{person}"
        d.mkdir(parents=True)
        for i in range(24):
            img = np.clip(np.array(colour[person]) + rng.normal(0, 10, (20, 20, 3)), 0, 255)
            Image.fromarray(img.astype("uint8")).save(d / f"{i}.png")
    for i in range(4):
        img = np.clip(np.array(colour[2]) + rng.normal(0, 10, (20, 20, 3)), 0, 255)
        Image.fromarray(img.astype("uint8")).save(root / "person0" / f"planted{i}.png")
    return root


def _digest(root):
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["spectral", "activations"])
def test_scan_lists_the_planted_photos_and_touches_no_file(planted_folder, tmp_path, capsys,
                                                          method):
    from tfadv.cli import main

    model = colour_embedder()
    path = tmp_path / "embedder.keras"
    model.save(path)
    (planted_folder / "person1" / "notes.txt").write_text("not a photo")
    before = _digest(planted_folder)
    main(["poison", "scan", str(planted_folder), "--model", str(path), "--no-crop",
          "--method", method, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert sorted(s["path"].rsplit("/", 1)[1] for s in result["suspects"]) == \
        [f"planted{i}.png" for i in range(4)]
    assert result["suspect_identities"] == ["person0"] and result["images"] == 76
    assert result["reasons"] == {"person0": "photos that look like person2"}
    assert {s["looks_like"] for s in result["suspects"]} == {"person2"}
    assert [s["path"].rsplit("/", 1)[1] for s in result["skipped"]] == ["notes.txt"]
    assert _digest(planted_folder) == before


def test_finetune_scan_excludes_suspects_from_training_only(planted_folder, tmp_path,
                                                            monkeypatch):
    """--scan-poison exclude: the planted photos are left out of the fine-tuning set (fewer
    photos trained on), reported in poison_scan.json, and the folder is unchanged."""
    from tfadv.data import faces as faces_lib
    from tfadv.recipes import facenet as R

    train = faces_lib.load_face_folder(planted_folder, detector="none", size=SIZE)
    splits = R.FaceSplits(train, train, [0, 1, 2], [])
    monkeypatch.setattr(R, "pretrained", lambda preset: colour_embedder())
    # A tiny model has no InceptionResNetV1 stages to freeze.
    monkeypatch.setattr(R, "freeze_backbone", lambda model, until, **kw: 0)
    seen = {}
    real = R._train_dataset
    monkeypatch.setattr(R, "_train_dataset", lambda x, y, cfg: seen.setdefault("n", len(x))
                        and real(x, y, cfg))
    before = _digest(planted_folder)
    for mode, trained in (("report", 76), ("exclude", 72)):
        seen.clear()
        cfg = R.FaceFinetuneConfig(out=str(tmp_path / mode), epochs=1, batch_size=8,
                                   scan_poison=mode, augment=False, train_steps=1,
                                   freeze_until="Conv2d_1a_3x3")
        metrics = R.finetune(cfg, progress=False, evaluate=False, splits=splits)
        assert seen["n"] == trained
        scan = json.loads((tmp_path / mode / "poison_scan.json").read_text())
        assert scan["flagged"] == 4 and scan["excluded"] == (mode == "exclude")
        assert metrics["poison_scan"]["suspect_identities"] == ["person0"]
    assert _digest(planted_folder) == before


def test_scan_names_unchecked_identities_and_warns_about_a_model_that_separates_nothing(
        planted_folder, tmp_path, capsys):
    from tfadv.cli import main

    tiny = planted_folder / "person9"
    tiny.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tiny / f"{i}.png")
    inputs = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Dense(3, kernel_initializer="zeros", bias_initializer="ones")(
        keras.layers.GlobalAveragePooling2D()(inputs))
    blind = tmp_path / "blind.keras"
    keras.Model(inputs, h).save(blind)
    good = tmp_path / "embedder.keras"
    colour_embedder().save(good)
    main(["poison", "scan", str(planted_folder), "--model", str(good), "--no-crop", "--json"])
    assert json.loads(capsys.readouterr().out)["unchecked"] == ["person9"]
    main(["poison", "scan", str(planted_folder), "--model", str(blind), "--no-crop"])
    out = capsys.readouterr().out
    assert "does not separate these identities" in out and "not checked" in out
    inputs = keras.Input((None, None, 3))
    free = tmp_path / "free.keras"
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs)).save(free)
    assert main(["poison", "scan", str(planted_folder), "--model", str(free), "--no-crop"]) == 2
    assert "Expected a face embedder" in capsys.readouterr().err
