"""The adversarial-faces generator: one attack factory, compiled budgets, its config."""

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_embedder
from tfadv.attacks import embedding as E
from tfadv.attacks import registry
from tfadv.config.faces import GenerateConfig
from tfadv.data import adversarial_records as R
from tfadv.evaluation import compiled as C
from tfadv.recipes import facenet_generate as G

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
OWN_MODULES = ["tfadv/recipes/facenet_generate.py", "tfadv/recipes/cleverhans_peer.py",
               *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tfadv/data").glob(
                   "adversarial_*.py"))]


@pytest.fixture
def faces_dir(tmp_path):
    """Two synthetic identities, two ready-cropped photos each."""
    rng = np.random.default_rng(0)
    for person in ("ann", "bob"):
        base = rng.uniform(0, 255, (SIZE, SIZE, 3))
        (tmp_path / "faces" / person).mkdir(parents=True)
        for k in range(2):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "faces" / person / f"{k}.png")
    return tmp_path / "faces"


# --------------------------------------------------------------------------- one factory


def test_our_attacks_are_built_through_the_registry(monkeypatch):
    built = []
    real_get = registry.get

    def recording_get(name, **kwargs):
        built.append(name)
        return real_get(name, **kwargs)

    monkeypatch.setattr(registry, "get", recording_get)
    for name in ("fgsm", "pgd", "apgd", "cw"):
        run, config = G.make_attack(name, "impersonation", 4.0, threshold=0.5, steps=3)
        assert run.attack is not None and config["library"] == "tfadv"
        assert config["targeted"] is True
    assert built == ["fgsm", "pgd", "embedding_apgd", "embedding_cw"]
    # The peer library's attacks are not ours: no registry, no Attack object.
    run, config = G.make_attack("cleverhans_pgd", "dodging", 4.0, threshold=0.5)
    assert built == ["fgsm", "pgd", "embedding_apgd", "embedding_cw"]
    assert not hasattr(run, "attack") and config["library"] == "cleverhans"


def test_configs_recorded_for_each_attack():
    _, fgsm = G.make_attack("fgsm", "dodging", 4, threshold=0.5)
    assert fgsm["class"] == "FGSM" and fgsm["step_size"] == 4.0 and fgsm["eps"] == 4.0
    _, pgd = G.make_attack("pgd", "dodging", 4, threshold=0.5, norm="L2")
    assert pgd["class"] == "PGD" and pgd["norm"] == "2" and pgd["step_size"] == pytest.approx(0.8)
    _, cw = G.make_attack("cw", "dodging", 4, threshold=0.3, cw_iterations=7)
    assert cw["class"] == "EmbeddingCW" and cw["eps"] is None and cw["threshold"] == 0.3
    _, ch = G.make_attack("cleverhans_fgsm", "impersonation", 2, threshold=0.5)
    assert ch["function"] == "fast_gradient_method" and ch["targeted"] is True


def test_shared_helpers_come_from_the_library():
    assert G.default_step_size is E.default_step_size
    for copy in ("_cosine", "_success", "_embed", "_cosine_distance_loss", "main",
                 "add_generate_command", "run_generate_command"):
        assert not hasattr(G, copy), copy


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "bim"}, "Unknown attack"),
    ({"mode": "evade"}, "mode"),
    ({"eps": -1.0}, "eps"),
    ({"eps": None}, "eps"),
    ({"threshold": 1.5}, r"\[-1, 1\]"),
    ({"norm": "l1"}, "norm"),
])
def test_make_attack_validation(kwargs, match):
    args = {"name": "pgd", "mode": "dodging", "eps": 4.0, "threshold": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        G.make_attack(args.pop("name"), args.pop("mode"), args.pop("eps"), **args)


# --------------------------------------------------------------------------- compiled budgets


def test_one_trace_per_attack_and_mode_across_budgets(faces_dir, tmp_path):
    model = tiny_embedder(SIZE)
    # Four faces in one batch: one input shape, so every trace is a new function.
    kwargs = dict(attacks=("pgd", "fgsm", "apgd"), modes=("dodging", "impersonation"), steps=2,
                  batch_size=4, detector="none", threshold=0.5)
    meta = G.generate(model, faces_dir, tmp_path / "a", eps_list=(1, 2, 4), **kwargs)
    assert meta["count"] == 3 * 2 * 3 * 4
    assert len(C.cached_keys(model)) == 3 * 2
    assert C.tracing_count(model) == 3 * 2
    # Other budgets, a later run: the same traces.
    G.generate(model, faces_dir, tmp_path / "b", eps_list=(8, 0.5), **kwargs)
    assert len(C.cached_keys(model)) == 3 * 2 and C.tracing_count(model) == 3 * 2
    # A fixed step is not relative to eps: one function per budget.
    G.generate(model, faces_dir, tmp_path / "c", eps_list=(2, 4), step_size=0.6,
               **{**kwargs, "attacks": ("pgd",), "modes": ("dodging",)})
    assert len(C.cached_keys(model)) == 3 * 2 + 2


def test_compiled_budgets_match_the_eager_attacks(faces_dir, tmp_path):
    model = tiny_embedder(SIZE)
    kwargs = dict(attacks=("pgd", "fgsm"), modes=("dodging", "impersonation"), steps=3,
                  eps_list=(2, 6), random_start=False, detector="none", threshold=0.5)
    G.generate(model, faces_dir, tmp_path / "compiled", **kwargs)
    G.generate(model, faces_dir, tmp_path / "eager", compiled=False, **kwargs)

    def by_key(out):
        return {(r["attack"], r["mode"], float(r["eps"]), int(r["source_index"])): r
                for r in R.read_records(out).as_numpy_iterator()}

    a, b = by_key(tmp_path / "compiled"), by_key(tmp_path / "eager")
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 2 * 4
    for key in a:
        np.testing.assert_allclose(a[key]["image"], b[key]["image"], atol=1e-3)
        assert a[key]["perturbation_linf"] <= key[2] + 1e-3
        # Both record the attack of the real budget, not the compiled eps=1 one.
        config = json.loads(a[key]["attack_config"])
        assert config == json.loads(b[key]["attack_config"]) and config["eps"] == key[2]


# --------------------------------------------------------------------------- the config


def test_generate_from_config_passes_every_setting(monkeypatch, tmp_path):
    seen = {}

    def fake_generate(model, faces, out, **kwargs):
        seen.update(model=model, faces=faces, out=out, **kwargs)
        return {"count": 0}

    monkeypatch.setattr(G, "generate", fake_generate)
    cfg = GenerateConfig(out="o", faces="f", attacks=("pgd",), eps=(3.0,), modes=("dodging",),
                         limit=7, threshold=0.4, steps=9, step_size=0.5, norm="2",
                         random_start=False, cw_iterations=11, cw_search_steps=2,
                         cw_confidence=0.1, cw_learning_rate=0.2, batch_size=5, shard_size=6,
                         image_format="png", detector="none", align=True, seed=4,
                         overwrite=True, progress=False)
    assert G.generate_from_config("m", cfg, compiled=False) == {"count": 0}
    renamed = {"eps": "eps_list", "faces": "faces", "out": "out"}
    for field in dataclasses.fields(GenerateConfig):
        assert seen[renamed.get(field.name, field.name)] == getattr(cfg, field.name), field.name
    assert seen["model"] == "m" and seen["compiled"] is False and seen["class_names"] is None


def test_generate_from_config_defaults_to_the_demo_faces(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(G, "generate", lambda model, faces, out, **kw: seen.update(faces=faces))

    class Assets:
        demo_faces = tmp_path / "demo"

    monkeypatch.setattr(G.assets, "require", lambda: Assets)
    G.generate_from_config("m", GenerateConfig(out="o"))
    assert seen["faces"] == tmp_path / "demo" / "val"

    def missing():
        raise FileNotFoundError("run `tfadv assets fetch`")

    monkeypatch.setattr(G.assets, "require", missing)
    with pytest.raises(FileNotFoundError, match="assets fetch"):
        G.generate_from_config("m", GenerateConfig(out="o"))


# --------------------------------------------------------------------------- module shape


@pytest.mark.parametrize("path", OWN_MODULES)
def test_module_is_small_and_uses_no_private_names_of_other_modules(path):
    text = (ROOT / path).read_text()
    assert len(text.splitlines()) < 500
    tree = ast.parse(text)
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules |= {a.asname or a.name for a in node.names}
            assert not any(a.name.startswith("_") for a in node.names), path
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            raise AssertionError(f"{path} uses {node.value.id}.{node.attr}")
