"""InceptionResNetV1 (FaceNet), Keras 3 and safe-mode loadable.

The layer names and the order of weighted layers follow keras-facenet's
builder, so weights saved from it (e.g. `facenet_keras.h5`, the 128-d
MS-Celeb-1M model) load with `load_weights`. Unlike keras-facenet, no
`Lambda` layer holds Python code: residual scaling is `Rescaling` and the
final L2 normalisation is `UnitNormalization`, so the model saves to `.keras`
and loads with `safe_mode=True`.
"""

from __future__ import annotations

import keras
from keras import layers


def _name(prefix, name, branch=None):
    if prefix is None:
        return None
    if branch is None:
        return f"{prefix}_{name}"
    return f"{prefix}_Branch_{branch}_{name}"


def _conv_bn(x, filters, kernel, strides=1, padding="same", activation="relu", use_bias=False,
             name=None):
    x = layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=use_bias,
                      name=name)(x)
    if not use_bias:
        x = layers.BatchNormalization(axis=3, momentum=0.995, epsilon=0.001, scale=False,
                                      name=_name(name, "BatchNorm"))(x)
    if activation is not None:
        x = layers.Activation(activation, name=_name(name, "Activation"))(x)
    return x


_BLOCKS = {
    # block type: [(branch, [(filters, kernel, layer name), ...]), ...]
    "Block35": [(0, [(32, 1, "Conv2d_1x1")]),
                (1, [(32, 1, "Conv2d_0a_1x1"), (32, 3, "Conv2d_0b_3x3")]),
                (2, [(32, 1, "Conv2d_0a_1x1"), (32, 3, "Conv2d_0b_3x3"),
                     (32, 3, "Conv2d_0c_3x3")])],
    "Block17": [(0, [(128, 1, "Conv2d_1x1")]),
                (1, [(128, 1, "Conv2d_0a_1x1"), (128, (1, 7), "Conv2d_0b_1x7"),
                     (128, (7, 1), "Conv2d_0c_7x1")])],
    "Block8": [(0, [(192, 1, "Conv2d_1x1")]),
               (1, [(192, 1, "Conv2d_0a_1x1"), (192, (1, 3), "Conv2d_0b_1x3"),
                    (192, (3, 1), "Conv2d_0c_3x1")])],
}


def _residual_block(x, scale, block_type, idx, activation="relu"):
    prefix = f"{block_type}_{idx}"
    branches = []
    for branch, convs in _BLOCKS[block_type]:
        h = x
        for filters, kernel, name in convs:
            h = _conv_bn(h, filters, kernel, name=_name(prefix, name, branch))
        branches.append(h)
    mixed = layers.Concatenate(axis=3, name=_name(prefix, "Concatenate"))(branches)
    up = _conv_bn(mixed, x.shape[-1], 1, activation=None, use_bias=True,
                  name=_name(prefix, "Conv2d_1x1"))
    up = layers.Rescaling(scale, name=_name(prefix, "ScaleResidual"))(up)
    x = layers.Add(name=_name(prefix, "Add"))([x, up])
    if activation is not None:
        x = layers.Activation(activation, name=_name(prefix, "Activation"))(x)
    return x


def inception_resnet_v1_backbone(input_shape=(160, 160, 3), embedding_dim=128,
                                 dropout_keep_prob=0.8, name="inception_resnet_v1"):
    """The FaceNet network from standardised pixels to an L2-normalised embedding.

    Args:
        input_shape: (H, W, 3) of standardised images (see `tfadv.models.facenet`
            for the model that takes raw pixels).
        embedding_dim: size of the bottleneck (128 for the MS-Celeb presets).
        dropout_keep_prob: keep probability of the dropout before the bottleneck.

    Returns:
        A functional Keras model, weight-compatible with keras-facenet's
        `InceptionResNetV1(classes=embedding_dim)`.
    """
    inputs = keras.Input(shape=input_shape, name="standardized_image")
    x = _conv_bn(inputs, 32, 3, strides=2, padding="valid", name="Conv2d_1a_3x3")
    x = _conv_bn(x, 32, 3, padding="valid", name="Conv2d_2a_3x3")
    x = _conv_bn(x, 64, 3, name="Conv2d_2b_3x3")
    x = layers.MaxPooling2D(3, strides=2, name="MaxPool_3a_3x3")(x)
    x = _conv_bn(x, 80, 1, padding="valid", name="Conv2d_3b_1x1")
    x = _conv_bn(x, 192, 3, padding="valid", name="Conv2d_4a_3x3")
    x = _conv_bn(x, 256, 3, strides=2, padding="valid", name="Conv2d_4b_3x3")
    for i in range(1, 6):
        x = _residual_block(x, 0.17, "Block35", i)

    b0 = _conv_bn(x, 384, 3, strides=2, padding="valid", name="Mixed_6a_Branch_0_Conv2d_1a_3x3")
    b1 = _conv_bn(x, 192, 1, name="Mixed_6a_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 192, 3, name="Mixed_6a_Branch_1_Conv2d_0b_3x3")
    b1 = _conv_bn(b1, 256, 3, strides=2, padding="valid", name="Mixed_6a_Branch_1_Conv2d_1a_3x3")
    bp = layers.MaxPooling2D(3, strides=2, padding="valid", name="Mixed_6a_Branch_2_MaxPool_1a_3x3")(x)
    x = layers.Concatenate(axis=3, name="Mixed_6a")([b0, b1, bp])
    for i in range(1, 11):
        x = _residual_block(x, 0.1, "Block17", i)

    b0 = _conv_bn(x, 256, 1, name="Mixed_7a_Branch_0_Conv2d_0a_1x1")
    b0 = _conv_bn(b0, 384, 3, strides=2, padding="valid", name="Mixed_7a_Branch_0_Conv2d_1a_3x3")
    b1 = _conv_bn(x, 256, 1, name="Mixed_7a_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 256, 3, strides=2, padding="valid", name="Mixed_7a_Branch_1_Conv2d_1a_3x3")
    b2 = _conv_bn(x, 256, 1, name="Mixed_7a_Branch_2_Conv2d_0a_1x1")
    b2 = _conv_bn(b2, 256, 3, name="Mixed_7a_Branch_2_Conv2d_0b_3x3")
    b2 = _conv_bn(b2, 256, 3, strides=2, padding="valid", name="Mixed_7a_Branch_2_Conv2d_1a_3x3")
    bp = layers.MaxPooling2D(3, strides=2, padding="valid", name="Mixed_7a_Branch_3_MaxPool_1a_3x3")(x)
    x = layers.Concatenate(axis=3, name="Mixed_7a")([b0, b1, b2, bp])
    for i in range(1, 6):
        x = _residual_block(x, 0.2, "Block8", i)
    x = _residual_block(x, 1.0, "Block8", 6, activation=None)

    x = layers.GlobalAveragePooling2D(name="AvgPool")(x)
    x = layers.Dropout(1.0 - dropout_keep_prob, name="Dropout")(x)
    x = layers.Dense(embedding_dim, use_bias=False, name="Bottleneck")(x)
    x = layers.BatchNormalization(momentum=0.995, epsilon=0.001, scale=False,
                                  name="Bottleneck_BatchNorm")(x)
    x = layers.UnitNormalization(axis=-1, name="normalize", dtype="float32")(x)
    return keras.Model(inputs, x, name=name)
