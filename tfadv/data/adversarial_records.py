"""Adversarial examples on disk: TFRecord shards with their metadata.

A generation run (`tfadv.recipes.facenet_generate.generate`) crafts
adversarial faces once; fine-tuning, evaluation and other models read them back
as a `tf.data` pipeline. One directory holds one run:

    out_dir/
      shard-00000-of-00003.tfrecord     tf.train.Example records
      shard-00001-of-00003.tfrecord
      shard-00002-of-00003.tfrecord
      metadata.json                     counts, per-group success rates, run settings

Each record is one adversarial image with everything needed to judge or filter
it (see `AdversarialExample`): the identity label and name, the source photo,
the attack's name and JSON configuration, eps, norm, mode (dodging or
impersonation), the target (-1 / "" when untargeted), the threshold and whether
the attack succeeded at it, the clean and adversarial cosine similarities to the
reference, and the size of the perturbation.

Image encoding. The default, `image_format="raw"`, stores the float32 pixels
as raw little-endian bytes with their shape: lossless, so the image read back
is bit-identical to the one whose success was measured. `image_format="png"`
stores the image rounded to uint8 (about 4x smaller after PNG compression,
viewable with any image tool); rounding changes the image, so the success
flag and similarities in a PNG record are only right if the writer of the
examples measured them on the rounded image (`generate` does), and the
perturbation of a rounded image can exceed eps by up to 0.5 when the clean
image is not integer-valued.

Writes are atomic at the level of the run: shards are written under hidden
temporary names (`.tmp-...`) and renamed to their final
`shard-XXXXX-of-NNNNN.tfrecord` names only after the last example is written,
then `metadata.json` is written (temp file + rename) last. A killed run leaves
only hidden temporary files, which readers never match; a run killed during
the renames leaves an incomplete `of-NNNNN` set, which `read_records` detects.

This module is the one import path; the code lives in three modules:
`adversarial_schema` (the record, its encoding, the directory layout),
`adversarial_writer` (shards and metadata) and `adversarial_datasets`
(`tf.data` pipelines).

Example:
    >>> meta = write_records("adv/", examples, shard_size=500)
    >>> ds = read_records("adv/")                          # dicts, one per record
    >>> pairs = to_training_pairs(ds, success_only=True)   # (image, label)
    >>> train = mix_with(clean_pairs, pairs, adv_fraction=0.3).batch(32)
"""

from tfadv.data.adversarial_datasets import (
    filter_records,
    mix_with,
    read_records,
    to_training_pairs,
)
from tfadv.data.adversarial_schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_FORMATS,
    METADATA_FILE,
    NO_EPS,
    NO_TARGET,
    SHARD_PATTERN,
    AdversarialExample,
    check_image_format,
    existing_shards,
    feature_spec,
    holds_records,
    load_metadata,
    parse_example,
    serialize_example,
    shard_files,
)
from tfadv.data.adversarial_writer import check_shard_size, write_records

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGE_FORMATS",
    "METADATA_FILE",
    "NO_EPS",
    "NO_TARGET",
    "SHARD_PATTERN",
    "AdversarialExample",
    "check_image_format",
    "check_shard_size",
    "existing_shards",
    "feature_spec",
    "filter_records",
    "holds_records",
    "load_metadata",
    "mix_with",
    "parse_example",
    "read_records",
    "serialize_example",
    "shard_files",
    "to_training_pairs",
    "write_records",
]
