"""Grad-CAM (Selvaraju et al., 2017) for a Keras functional model mapping images to logits.

For image x, class c and a layer with output A [h, w, channels]:
channel weights a_k = mean over (i, j) of d logit_c / d A_ijk; the map is
ReLU(sum_k a_k A_k), bilinearly resized to the image and divided by its
maximum (an all-zero map stays zero).
"""

import keras
import numpy as np
import tensorflow as tf

from trainer.errors import UserError


def _spatial(layer):
    try:
        return len(layer.output.shape) == 4
    except (AttributeError, ValueError):  # Not called in this graph, or several outputs.
        return False


def find_layer(model, name=None):
    """The layer Grad-CAM looks at: a block's output, a layer by name, or the last spatial layer.

    Args:
      model: a functional Keras model (layers in topological order).
      name: a block name of the gin declaration (its last layer, `<name>_...`,
        is used), a Keras layer name, or None for the last layer whose output
        is 4-D [batch, height, width, channels].

    Returns:
      A Keras layer with a 4-D output.

    Raises:
      UserError: no such block or layer, or its output is not 4-D.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if name is None:
        spatial = [layer for layer in layers if _spatial(layer)]
        if not spatial:
            raise UserError(f"Grad-CAM needs a layer with a 4-D output; network '{model.name}' has none.")
        return spatial[-1]
    exact = [layer for layer in layers if layer.name == name]
    candidates = exact or [layer for layer in layers if layer.name.startswith(f"{name}_")]
    if not candidates:
        spatial_names = [layer.name for layer in layers if _spatial(layer)]
        raise UserError(f"trainer.evaluate.gradcam_layer = {name!r}: expected a block or layer name of network "
                        f"'{model.name}', got none of that name. Layers with a spatial output: "
                        f"{', '.join(spatial_names[-8:]) or 'none'}.")
    layer = candidates[-1]
    if not _spatial(layer):
        raise UserError(f"trainer.evaluate.gradcam_layer = {name!r}: expected a block with a spatial "
                        f"(4-D) output, got layer '{layer.name}' with output shape {tuple(layer.output.shape)}.")
    return layer


def gradcam(model, images, classes, layer):
    """Grad-CAM maps of `classes` on `images`.

    Args:
      model: a functional Keras model mapping [N, S, S, 3] images to logits.
      images: float32 [N, S, S, 3].
      classes: [N] class index whose logit is explained, per image.
      layer: the layer to look at (see `find_layer`).

    Returns:
      float32 numpy [N, S, S] in [0, 1].
    """
    probe = keras.Model(model.inputs, [layer.output, model.outputs[0]])
    images = tf.convert_to_tensor(images, tf.float32)
    classes = tf.convert_to_tensor(np.asarray(classes), tf.int32)
    with tf.GradientTape() as tape:
        activations, logits = probe(images, training=False)
        tape.watch(activations)
        chosen = tf.gather(tf.cast(logits, tf.float32), classes, axis=1, batch_dims=1)
    grads = tf.cast(tape.gradient(chosen, activations), tf.float32)
    activations = tf.cast(activations, tf.float32)
    weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, tf.shape(images)[1:3], method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
    return tf.math.divide_no_nan(cam, peak).numpy()
