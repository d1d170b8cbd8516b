"""Encoded photos to model pixels inside the exported graph (TF ops only).

The `embed_images` and `verify_images` signatures take JPEG, PNG, BMP, GIF or WebP
bytes (DT_STRING [N]) and run this pipeline in the SavedModel itself, so the
stock TF Serving binary serves them unchanged. For a photo that is already a
face crop it gives the pixels `tfadv.data.faces` gives with `detector="none"`
(`center_crop_resize`): the central square (offset `round((H - side) / 2)`,
ties to even, as Python's `round`), resized to `size x size` by area averaging
when shrinking and bilinearly when enlarging (OpenCV's INTER_AREA /
INTER_LINEAR, which `center_crop_resize` uses), rounded to whole grey levels.
A crop of exactly `size x size` passes through untouched.

Unlike `tfadv.data.images.read_image` (PIL), the graph does not apply EXIF
orientation and drops an alpha channel instead of compositing onto white:
clients send crops they made themselves (`tfadv.serving.Client.embed_files`
crops, then encodes a plain RGB JPEG or PNG).

A batch holding bytes that do not decode fails with INVALID_ARGUMENT whose
message names the input and the indices of the bad images.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfadv.data.images import encode_image

__all__ = ["FORMATS", "SENTINEL", "decode_crops"]

FORMATS = "JPEG, PNG, GIF, BMP or WebP"
SENTINEL = encode_image(np.zeros((1, 1, 3), np.uint8))  # a black 1 x 1 PNG, a graph constant


def _square_resize(image, size: int):
    """uint8 [H, W, 3] -> float32 [size, size, 3] in whole grey levels (0-255)."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    side = tf.minimum(h, w)
    # round((h - side) / 2) with ties to even: Python's round, as center_crop_resize.
    top = tf.cast(tf.math.round(tf.cast(h - side, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.math.round(tf.cast(w - side, tf.float32) / 2.0), tf.int32)
    square = tf.cast(image[top:top + side, left:left + side], tf.float32)

    def resized(method):
        return lambda: tf.image.resize(square, [size, size], method=method)

    out = tf.case([(side > size, resized("area")), (side < size, resized("bilinear"))],
                  default=lambda: square)
    return tf.clip_by_value(tf.math.round(out), 0.0, 255.0)


def decode_crops(data, size: int, *, name: str = "images_bytes"):
    """Decodes a batch of encoded face crops to the model's pixels.

    Args:
        data: tf.string [N], each a JPEG, PNG, BMP, GIF or WebP file (a GIF gives
            its first frame; greyscale is repeated to 3 channels; 16-bit PNG
            is scaled to 8 bits).
        size: the model's input side, in pixels (160 for FaceNet).
        name: the input's name, used in the error message.

    Returns:
        float32 [N, size, size, 3], raw RGB in whole grey levels, [0, 255].

    Raises:
        tf.errors.InvalidArgumentError: (when the graph runs) some elements
            do not decode; the message names `name` and their indices.
    """
    n = tf.shape(data)[0]
    # One more element, always decodable (a black 1 x 1 PNG), so the batch below is never
    # empty (get_single_element needs exactly one; Dataset.reduce is 4x slower); dropped after.
    padded = tf.concat([data, tf.constant([SENTINEL])], 0)
    indexed = tf.data.Dataset.from_tensor_slices((tf.range(n + 1), padded))

    def decode(i, encoded):
        # JPEG with the accurate integer DCT: PIL's (libjpeg's) default, so the pixels are
        # read_image's; TF's default fast DCT differs by up to 4 grey levels.
        image = tf.cond(
            tf.io.is_jpeg(encoded),
            lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(encoded, channels=3, dtype=tf.uint8,
                                       expand_animations=False))
        return i, _square_resize(image, size)

    # Elements that fail to decode are skipped (and named below), not fatal to the batch.
    decoded = indexed.map(decode).ignore_errors().batch(tf.cast(n + 1, tf.int64))
    index, pixels = decoded.get_single_element()
    real = index < n
    index, pixels = tf.boolean_mask(index, real), tf.boolean_mask(pixels, real)
    present = tf.scatter_nd(index[:, None], tf.ones_like(index), [n])
    bad = tf.where(tf.equal(present, 0))[:, 0]
    listed = tf.strings.reduce_join(tf.strings.as_string(bad), separator=", ")
    message = tf.strings.join([f"{name}: the images at indices [", listed,
                               f"] of the batch do not decode as {FORMATS} files"])
    check = tf.debugging.Assert(tf.equal(tf.size(bad), 0), [message])
    with tf.control_dependencies([check]):
        return tf.identity(pixels)
