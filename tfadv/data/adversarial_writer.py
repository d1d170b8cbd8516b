"""Writing a run of adversarial records: TFRecord shards, then `metadata.json`.

Shards are written under hidden temporary names and renamed to
`shard-XXXXX-of-NNNNN.tfrecord` once the last example is written;
`metadata.json` (counts and per-group statistics) comes last. See
`tfadv.data.adversarial_records` for the layout and the record fields.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import tensorflow as tf

from tfadv.attacks.embedding import success_at
from tfadv.data.adversarial_schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_FILE,
    NO_EPS,
    TMP_PREFIX,
    AdversarialExample,
    check_image_format,
    existing_shards,
    serialize_example,
    to_json,
)


def _group_key(ex: AdversarialExample):
    return (ex.attack, float(ex.eps), ex.mode, ex.norm)


class GroupStats:
    """Running numbers of one (attack, eps, mode, norm) group for `metadata.json`."""

    def __init__(self):
        self.count = 0
        self.success = 0
        self.clean_success = 0
        self.clean_sim = []
        self.adv_sim = []
        self.l2 = []
        self.linf = []

    def add(self, ex: AdversarialExample):
        self.count += 1
        self.success += int(bool(ex.success))
        thr = float(ex.threshold)
        sim = float(ex.clean_similarity)
        if math.isfinite(thr) and math.isfinite(sim):
            # The record's own success rule (see AdversarialExample.success),
            # applied to the clean similarity it stores.
            self.clean_success += int(success_at(sim, thr, ex.mode))
        self.clean_sim.append(sim)
        self.adv_sim.append(float(ex.adversarial_similarity))
        self.l2.append(float(ex.perturbation_l2))
        self.linf.append(float(ex.perturbation_linf))

    def summary(self, key) -> dict:
        attack, eps, mode, norm = key

        def stat(fn, values):
            values = np.asarray(values, np.float64)
            values = values[np.isfinite(values)]
            return float(fn(values)) if values.size else None

        return {
            "attack": attack, "eps": None if eps == NO_EPS else eps, "mode": mode, "norm": norm,
            "count": self.count, "successes": self.success,
            "success_rate": self.success / self.count if self.count else None,
            # Fraction that already "succeeded" without the attack (e.g. a
            # clean face below the threshold to its own reference).
            "clean_success_rate": self.clean_success / self.count if self.count else None,
            "mean_clean_similarity": stat(np.mean, self.clean_sim),
            "mean_adversarial_similarity": stat(np.mean, self.adv_sim),
            "median_perturbation_l2": stat(np.median, self.l2),
            "max_perturbation_linf": stat(np.max, self.linf),
        }


def check_shard_size(shard_size) -> int:
    """`shard_size` if it is an integer >= 1.

    Raises:
        ValueError: anything else (bools included).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"Expected shard_size to be an integer >= 1. "
                         f"Received: shard_size={shard_size!r}")
    return shard_size


def write_records(out_dir, examples: Iterable[AdversarialExample], *, shard_size: int = 1000,
                  image_format: str = "raw", compression: str | None = None,
                  metadata: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
                  overwrite: bool = False) -> dict:
    """Writes adversarial examples as TFRecord shards plus `metadata.json`.

    Examples are consumed lazily (a generator that crafts them batch by batch
    never holds the whole run in memory). Shards are written under hidden
    temporary names and renamed to `shard-XXXXX-of-NNNNN.tfrecord` once all
    examples are written; `metadata.json` is written last. If the iterable
    raises, the temporary files are removed and nothing visible is written.

    Args:
        out_dir: directory of the run (created if missing).
        examples: iterable of `AdversarialExample`.
        shard_size: examples per shard (the last one may hold fewer).
        image_format: "raw" (float32 bytes, lossless; default) or "png"
            (rounded uint8; see `tfadv.data.adversarial_records`).
        compression: None, "GZIP" or "ZLIB" (TFRecord compression).
        metadata: extra JSON-serialisable fields for `metadata.json` (model,
            settings, ...), or a callable returning them, called after the
            last example is written (for numbers known only then, such as
            the run time).
        overwrite: replace the shards and metadata of an earlier run in
            `out_dir`. Without it, an `out_dir` holding shards is an error.

    Returns:
        The metadata dict written to `metadata.json`: "format", "version",
        "count", "image_format", "image_shape", "compression", "shards"
        (file names and counts), "counts" (by attack, by mode), "attacks",
        "eps" (sorted budgets, without `NO_EPS`), "groups" (one entry per
        attack/eps/mode/norm with count, success rate, clean success rate,
        mean similarities, median L2 and max Linf of the perturbation), plus
        the fields of `metadata`.

    Raises:
        FileExistsError: `out_dir` holds shards or metadata and `overwrite` is False.
        ValueError: bad arguments, or an example with a bad image.

    Example:
        >>> write_records("adv/", examples, shard_size=500, metadata={"model": "facenet"})
    """
    check_image_format(image_format)
    check_shard_size(shard_size)
    if compression not in (None, "", "GZIP", "ZLIB"):
        raise ValueError("Expected compression in (None, 'GZIP', 'ZLIB'). "
                         f"Received: compression={compression!r}")
    compression = compression or None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = existing_shards(out_dir)
    if (old or (out_dir / METADATA_FILE).exists()) and not overwrite:
        raise FileExistsError(
            f"{str(out_dir)!r} already holds adversarial records ({len(old)} shards). "
            "Choose another directory or pass overwrite=True."
        )

    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp_paths: list[Path] = []
    shard_counts: list[int] = []
    groups: "OrderedDict[tuple, GroupStats]" = OrderedDict()
    attacks, by_mode = OrderedDict(), OrderedDict()
    image_shape = None
    options = tf.io.TFRecordOptions(compression_type=compression or "")
    writer = None
    tmp_meta = out_dir / f"{TMP_PREFIX}{token}-{METADATA_FILE}"
    try:
        for ex in examples:
            if not isinstance(ex, AdversarialExample):
                raise ValueError("Expected AdversarialExample items. "
                                 f"Received: {type(ex).__name__}")
            data = serialize_example(ex, image_format)
            shape = list(np.shape(ex.image))
            if image_shape is None:
                image_shape = shape
            elif shape != image_shape:
                raise ValueError("Expected all images of one run to have one shape. Received: "
                                 f"{shape} after {image_shape}.")
            if writer is None or shard_counts[-1] >= shard_size:
                if writer is not None:
                    writer.close()
                path = out_dir / f"{TMP_PREFIX}{token}-{len(tmp_paths):05d}.tfrecord"
                tmp_paths.append(path)
                shard_counts.append(0)
                writer = tf.io.TFRecordWriter(str(path), options)
            writer.write(data)
            shard_counts[-1] += 1
            groups.setdefault(_group_key(ex), GroupStats()).add(ex)
            attacks[ex.attack] = attacks.get(ex.attack, 0) + 1
            by_mode[ex.mode] = by_mode.get(ex.mode, 0) + 1
        if writer is not None:
            writer.close()
            writer = None
        extra = dict(metadata() if callable(metadata) else (metadata or {}))
        n = len(tmp_paths)
        final = [out_dir / f"shard-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)]
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "count": int(sum(shard_counts)),
            "image_format": image_format,
            "image_shape": image_shape,
            "compression": compression,
            "shards": [{"file": p.name, "count": c} for p, c in zip(final, shard_counts)],
            "counts": {"by_attack": dict(attacks), "by_mode": dict(by_mode)},
            "attacks": list(attacks),
            "eps": sorted({k[1] for k in groups if k[1] != NO_EPS}),
            "groups": [stats.summary(key) for key, stats in groups.items()],
        }
        clash = sorted(set(extra) & set(meta))
        if clash:
            raise ValueError(f"metadata must not redefine the fields {clash}; they are computed.")
        meta.update(extra)
        text = to_json(meta, indent=2) + "\n"
        tmp_meta.write_text(text)

        # Everything is on disk: now make it visible, metadata last.
        if overwrite:
            for path in old:
                path.unlink(missing_ok=True)
            (out_dir / METADATA_FILE).unlink(missing_ok=True)
        for tmp, path in zip(tmp_paths, final):
            os.replace(tmp, path)
        os.replace(tmp_meta, out_dir / METADATA_FILE)
    except BaseException:
        if writer is not None:
            writer.close()
        for path in [*tmp_paths, tmp_meta]:
            path.unlink(missing_ok=True)
        raise
    return json.loads(text)
