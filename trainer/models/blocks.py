"""The block library: every kind of block a gin declaration can name, defined once.

A block is a registered factory `fn(x, *, name, **kwargs) -> output tensor`
that composes stock Keras 3 layers in the functional API. `x` is one Keras
tensor, or a list of them for the merge kinds (`concat`, `add`). Every layer
a block makes is named `<name>_<part>`, so `model.summary()` reads block by
block.

Every factory is gin-configurable as `trainer.blocks.<kind>`: a binding sets
the default for every block of that kind, a key in a block's dict overrides
it for that block. The defaults are the reference network's effective
settings (docs/reference_recipe.md). A model file scopes the defaults its
network needs under the network's name, so they reach no other network:

    reference/trainer.blocks.sepconv.l2 = 1e-4                         # the he_normal + L2 variant ...
    reference/trainer.blocks.sepconv.kernel_initializer = 'he_normal'  # ... of the reference's sepconvs
    small/trainer.blocks.batch_norm.momentum = 0.9

Whether BatchNorm synchronises its statistics over replicas is the strategy's
setting (`synchronized_batch_norm`), applied while the trainer builds the
network (`synchronized_batch_norm(...)`). `batch_norm.virtual_batch_size`
makes it Ghost BatchNorm: statistics over groups of that many images of the
batch (`GhostBatchNormalization`), as each core of a TPU saw its share.

List the kinds and their arguments, read from the registry below:
`python -m trainer.models.blocks --list` (`--markdown`: the table of
docs/writing_a_network.md, which a test keeps equal to it).
"""

if __name__ == "__main__":  # `--help` answers before TensorFlow loads.
    from trainer import cli as _cli

    _cli.fast_help(__doc__ + "\nFlags:\n  --list      print every block kind with its arguments and one line each.\n"
                   "  --markdown  the same as a markdown table.\n")

import contextlib
import dataclasses
import inspect
from typing import Callable

import keras

from trainer import registry
from trainer.errors import UserError

GIN_MODULE = "trainer.blocks"


@dataclasses.dataclass(frozen=True)
class Kind:
    """A registered block kind.

    Attributes:
      name: what a declaration writes as `'kind'`.
      factory: the gin-configurable factory the builder calls.
      signature_of: the undecorated function (its signature lists the kwargs).
      multi_input: True if the factory takes the list of its inputs itself
        (merge kinds); otherwise the builder merges several inputs first.
    """

    name: str
    factory: Callable
    signature_of: Callable
    multi_input: bool


KINDS: dict[str, Kind] = {}


def register(kind: str, multi_input: bool = False):
    """Registers a block factory under `kind` and makes it gin-configurable.

    Args:
      kind: the name declarations use, also the gin configurable's name.
      multi_input: the factory takes a list of tensors (see `Kind`).

    Returns:
      A decorator returning the gin-configurable factory.
    """

    def decorator(fn):
        configurable = registry.configurable(GIN_MODULE, name=kind)(fn)
        KINDS[kind] = Kind(kind, configurable, fn, multi_input)
        return configurable

    return decorator


# --- Shared settings: BatchNorm, activation, regularisation -------------------


@registry.configurable(GIN_MODULE)
def batch_norm(name: str, momentum: float = 0.99, epsilon: float = 1e-3,
               synchronized: bool | None = None,
               virtual_batch_size: int | None = None) -> keras.layers.Layer:
    """The BatchNormalization layer every block uses.

    Args:
      name: layer name.
      momentum: moving-statistics momentum (Keras default, as the reference).
      epsilon: variance epsilon (Keras default, as the reference).
      synchronized: compute batch statistics across all replicas of a
        `tf.distribute` strategy; None: as the strategy says (see
        `synchronized_batch_norm`).
      virtual_batch_size: None: statistics over the whole (per-replica) batch.
        An integer v: Ghost BatchNorm, statistics over each group of v
        consecutive images of the batch (`GhostBatchNormalization`), e.g. 16
        with a batch of 128 reproduces a TPU v2-8's per-core statistics on one
        device. The batch must be a multiple of v. Virtual batches are never
        synchronised over replicas.

    Returns:
      A `keras.layers.BatchNormalization` (a `GhostBatchNormalization` with
      `virtual_batch_size`).

    Raises:
      UserError: `virtual_batch_size` is not a positive integer.
    """
    if virtual_batch_size is None:
        return keras.layers.BatchNormalization(
            momentum=momentum, epsilon=epsilon, name=name,
            synchronized=_SYNCHRONIZED[-1] if synchronized is None else synchronized)
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise UserError(f"trainer.blocks.batch_norm.virtual_batch_size must be None or a positive integer, got "
                        f"{virtual_batch_size!r} (BatchNorm '{name}').")
    return GhostBatchNormalization(virtual_batch_size=virtual_batch_size, momentum=momentum, epsilon=epsilon,
                                   name=name)


@keras.saving.register_keras_serializable(package="trainer")
class GhostBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization over virtual batches ("Ghost BatchNorm", Hoffer et al. 2017).

    In training, a batch [B, ...] is split into B/v groups of v consecutive
    examples ([B, ...] -> [B/v, v, ...]); each group is normalised by its own
    mean and (biased) variance, then scaled and shifted by the layer's one
    gamma and beta. The moving mean and variance are updated once a step with
    the mean over the groups of their means and variances, as TF1's
    `virtual_batch_size` did (TF1 grouped strided examples rather than
    consecutive ones; on a shuffled batch the two are alike). In inference
    the layer is plain BatchNormalization with the moving statistics.

    One device thus reproduces what a data-parallel run computed per replica:
    a TPU v2-8 with a global batch of 128 normalised over 16 images a core.

    Args:
      virtual_batch_size: images a group (v). The batch (per replica) must be
        a multiple of it; otherwise calling the layer in training raises a
        UserError naming the block.
      **kwargs: `keras.layers.BatchNormalization`'s arguments (not `renorm`,
        not a mask in training).
    """

    def __init__(self, virtual_batch_size, **kwargs):
        super().__init__(**kwargs)
        if self.renorm:
            raise UserError(f"BatchNorm '{self.name}': virtual_batch_size cannot be combined with renorm.")
        self.virtual_batch_size = int(virtual_batch_size)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise UserError(f"BatchNorm '{self.name}': virtual batches do not take a mask.")
        v = self.virtual_batch_size
        batch = inputs.shape[0]
        if batch is not None and batch % v:
            block = self.name[:-3] if self.name.endswith("_bn") else self.name
            raise UserError(
                f"block '{block}': its BatchNorm ('{self.name}') normalises over virtual batches of "
                f"{v} images (trainer.blocks.batch_norm.virtual_batch_size), but the batch (per replica) has "
                f"{batch} images, not a multiple of {v}. Set BATCH_SIZE / replicas to a multiple of {v} or "
                f"change virtual_batch_size.")
        x = keras.ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        rank = len(x.shape)
        axis = self.axis % rank
        dynamic = keras.ops.shape(x)
        inner = [d if d is not None else dynamic[i] for i, d in enumerate(x.shape) if i > 0]
        grouped = keras.ops.reshape(x, [-1, v] + inner)  # [B/v, v, ...]
        # Reduce over the images of a group (axis 1) and every axis but the channels'.
        reduce = [1] + [i + 1 for i in range(1, rank) if i != axis]
        mean, variance = keras.ops.moments(grouped, axes=reduce, keepdims=True)
        broadcast = [1] * (rank + 1)
        broadcast[axis + 1] = x.shape[axis]
        scale = keras.ops.rsqrt(variance + self.epsilon)
        if self.scale:
            scale = scale * keras.ops.reshape(keras.ops.cast(self.gamma, x.dtype), broadcast)
        outputs = (grouped - mean) * scale
        if self.center:
            outputs = outputs + keras.ops.reshape(keras.ops.cast(self.beta, x.dtype), broadcast)
        outputs = keras.ops.reshape(outputs, keras.ops.shape(x))
        # The moving statistics follow the mean of the groups' statistics.
        mean = keras.ops.reshape(keras.ops.mean(mean, axis=0), [-1])
        variance = keras.ops.reshape(keras.ops.mean(variance, axis=0), [-1])
        self.moving_mean.assign(keras.ops.cast(self.moving_mean, x.dtype) * self.momentum
                                + mean * (1.0 - self.momentum))
        self.moving_variance.assign(keras.ops.cast(self.moving_variance, x.dtype) * self.momentum
                                    + variance * (1.0 - self.momentum))
        return keras.ops.cast(outputs, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "virtual_batch_size": self.virtual_batch_size}


_SYNCHRONIZED = [False]


@contextlib.contextmanager
def synchronized_batch_norm(enabled):
    """Within this context, BatchNorm layers synchronise their statistics over replicas if `enabled`."""
    _SYNCHRONIZED.append(bool(enabled))
    try:
        yield
    finally:
        _SYNCHRONIZED.pop()


def _activation(x, activation, name):
    """Applies `activation` (a Keras activation name), or nothing if it is None."""
    if activation is None:
        return x
    return keras.layers.Activation(activation, name=name)(x)


def _l2(l2):
    """An L2 regulariser, or None when `l2` is 0."""
    return keras.regularizers.L2(l2) if l2 else None


def _conv_bn_act(x, conv_layer, name, activation, preact):
    """conv -> BN -> activation, or BN -> activation -> conv when `preact`."""
    if preact:
        x = batch_norm(name=f"{name}_bn")(x)
        x = _activation(x, activation, f"{name}_{activation}")
        return conv_layer(x)
    x = batch_norm(name=f"{name}_bn")(conv_layer(x))
    return _activation(x, activation, f"{name}_{activation}")


def _require_spatial(x, kind):
    if len(x.shape) != 4:
        raise UserError(
            f"a '{kind}' block needs a [batch, height, width, channels] input, got shape "
            f"{tuple(x.shape[1:])}: it must come before any global pooling.")


# --- Convolutions -------------------------------------------------------------


@register("conv")
def conv(x, *, name: str, filters: int, kernel_size: int = 3, strides: int = 1,
         dilation_rate: int = 1, padding: str = "same", use_bias: bool = True,
         kernel_initializer: str = "he_normal", l2: float = 1e-4,
         activation: str | None = "relu", preact: bool = False):
    """Conv2D -> BatchNorm -> activation (the reference Transition's settings).

    Args:
      x: NHWC input.
      name: block name (prefix of the layer names).
      filters: output channels.
      kernel_size: square kernel side.
      strides: stride of the convolution.
      dilation_rate: dilation of the convolution.
      padding: 'same' or 'valid'.
      use_bias: whether the convolution has a bias.
      kernel_initializer: Keras initializer name for the kernel.
      l2: L2 weight decay on the kernel (0 for none).
      activation: Keras activation name, or None for conv -> BN only.
      preact: order BN -> activation -> conv (pre-activation networks).

    Returns:
      The output tensor.
    """
    _require_spatial(x, "conv")
    layer = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, dilation_rate=dilation_rate,
        use_bias=use_bias, kernel_initializer=kernel_initializer,
        kernel_regularizer=_l2(l2), name=f"{name}_conv")
    return _conv_bn_act(x, layer, name, activation, preact)


@register("sepconv")
def sepconv(x, *, name: str, filters: int, kernel_size: int = 3, strides: int = 1,
            depth_multiplier: int = 1, use_bias: bool = True,
            kernel_initializer: str = "glorot_uniform", l2: float = 0.0,
            activation: str | None = "relu", preact: bool = False):
    """SeparableConv2D (same padding) -> BatchNorm -> activation.

    The defaults are the reference's effective settings: glorot-uniform
    kernels and no weight decay (Keras 2 ignored the he_normal/L2 the
    reference passed). `kernel_initializer` and `l2` apply to both the
    depthwise and the pointwise kernel.

    Args:
      x: NHWC input.
      name: block name.
      filters: output channels.
      kernel_size: square depthwise kernel side.
      strides: stride of the depthwise convolution.
      depth_multiplier: depthwise channels per input channel.
      use_bias: whether the pointwise convolution has a bias.
      kernel_initializer: Keras initializer for both kernels.
      l2: L2 weight decay on both kernels (0 for none).
      activation: Keras activation name, or None.
      preact: order BN -> activation -> conv.

    Returns:
      The output tensor.
    """
    _require_spatial(x, "sepconv")
    layer = keras.layers.SeparableConv2D(
        filters, kernel_size, strides=strides, padding="same",
        depth_multiplier=depth_multiplier, use_bias=use_bias,
        depthwise_initializer=kernel_initializer, pointwise_initializer=kernel_initializer,
        depthwise_regularizer=_l2(l2), pointwise_regularizer=_l2(l2), name=f"{name}_sepconv")
    return _conv_bn_act(x, layer, name, activation, preact)


@register("transition")
def transition(x, *, name: str, filters: int):
    """The reference Transition: a 1x1 `conv` block (Conv2D 1x1 -> BN -> ReLU).

    Its initializer, L2 and bias are `conv`'s (he_normal, 1e-4, bias in the
    reference): bind `conv.*` to change them.

    Args:
      x: NHWC input.
      name: block name.
      filters: output channels.

    Returns:
      The output tensor.
    """
    return conv(x, name=name, filters=filters, kernel_size=1)


@register("bn_relu")
def bn_relu(x, *, name: str, activation: str = "relu"):
    """BatchNorm -> activation (closes a pre-activation network before its head).

    Args:
      x: input tensor.
      name: block name.
      activation: Keras activation name.

    Returns:
      The output tensor.
    """
    return _activation(batch_norm(name=f"{name}_bn")(x), activation, f"{name}_{activation}")


# --- Units with skips -----------------------------------------------------------


@register("dense_unit")
def dense_unit(x, *, name: str, filters: int, conv_kind: str = "sepconv", bottleneck: int = 0):
    """A densely connected unit: y = two convolutions of x; output concat[x, y].

    The reference's DenseUnit(f) is x -> sepconv(f) -> sepconv(f). With
    `bottleneck` > 0 it is DenseNet-B's x -> conv 1x1(bottleneck) ->
    <conv_kind> 3x3(filters). Channels grow by `filters`.

    Args:
      x: NHWC input.
      name: block name.
      filters: channels added to the input (the growth).
      conv_kind: 'sepconv' or 'conv', the kind of the 3x3 convolutions.
      bottleneck: channels of a 1x1 `conv` replacing the first 3x3 (0: none).

    Returns:
      concat([x, y]).

    Raises:
      UserError: `conv_kind` is not 'sepconv' or 'conv'.
    """
    _require_spatial(x, "dense_unit")
    if conv_kind not in ("sepconv", "conv"):
        raise UserError(f"conv_kind must be 'sepconv' or 'conv', got {conv_kind!r}.")
    conv3x3 = KINDS[conv_kind].factory
    if bottleneck:
        y = conv(x, name=f"{name}_a", filters=bottleneck, kernel_size=1)
    else:
        y = conv3x3(x, name=f"{name}_a", filters=filters)
    y = conv3x3(y, name=f"{name}_b", filters=filters)
    return concat([x, y], name=name)


def _shortcut(x, name, channels, strides, use_bias):
    """x itself, or a projection (conv 1x1 -> BN) where the shape changes."""
    if strides == 1 and x.shape[-1] == channels:
        return x
    return conv(x, name=f"{name}_proj", filters=channels, kernel_size=1, strides=strides,
                use_bias=use_bias, activation=None, preact=False)


def _residual_output(shortcut, y, name, activation):
    out = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return _activation(out, activation, f"{name}_out_{activation}")


@register("residual_basic")
def residual_basic(x, *, name: str, filters: int, strides: int = 1, use_bias: bool = False,
                   activation: str = "relu"):
    """ResNet basic unit: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU.

    The shortcut is a 1x1 projection (conv -> BN) where the stride or the
    channels change, else the identity. Other conv settings are `conv`'s.

    Args:
      x: NHWC input.
      name: block name.
      filters: output channels.
      strides: stride of the first convolution (and of the projection).
      use_bias: whether the convolutions have biases (BN follows each).
      activation: Keras activation name.

    Returns:
      The output tensor.
    """
    _require_spatial(x, "residual_basic")
    y = conv(x, name=f"{name}_a", filters=filters, strides=strides, use_bias=use_bias,
             activation=activation, preact=False)
    y = conv(y, name=f"{name}_b", filters=filters, use_bias=use_bias, activation=None,
             preact=False)
    return _residual_output(_shortcut(x, name, filters, strides, use_bias), y, name, activation)


@register("residual_bottleneck")
def residual_bottleneck(x, *, name: str, filters: int, strides: int = 1, expansion: int = 4,
                        use_bias: bool = False, activation: str = "relu"):
    """ResNet bottleneck unit: 1x1(f) -> 3x3(f, stride) -> 1x1(expansion*f), + shortcut.

    Each convolution is followed by BN; ReLU after the first two and after
    the sum. The shortcut is projected where the shape changes.

    Args:
      x: NHWC input.
      name: block name.
      filters: bottleneck channels; the output has `expansion * filters`.
      strides: stride of the 3x3 convolution (and of the projection).
      expansion: output channels per bottleneck channel.
      use_bias: whether the convolutions have biases.
      activation: Keras activation name.

    Returns:
      The output tensor.
    """
    _require_spatial(x, "residual_bottleneck")
    common = dict(use_bias=use_bias, preact=False)
    y = conv(x, name=f"{name}_a", filters=filters, kernel_size=1, activation=activation, **common)
    y = conv(y, name=f"{name}_b", filters=filters, strides=strides, activation=activation,
             **common)
    y = conv(y, name=f"{name}_c", filters=expansion * filters, kernel_size=1, activation=None,
             **common)
    shortcut = _shortcut(x, name, expansion * filters, strides, use_bias)
    return _residual_output(shortcut, y, name, activation)


# --- Pooling --------------------------------------------------------------------


def _pool(layer_class, x, name, pool_size, strides, padding):
    return layer_class(pool_size=pool_size, strides=strides or pool_size, padding=padding,
                       name=f"{name}_pool")(x)


@register("max_pool")
def max_pool(x, *, name: str, pool_size: int = 2, strides: int | None = None,
             padding: str = "valid"):
    """MaxPooling2D (2x2 stride 2 by default, as the reference).

    Args:
      x: NHWC input.
      name: block name.
      pool_size: square window side.
      strides: stride (default: `pool_size`).
      padding: 'valid' or 'same'.

    Returns:
      The output tensor.
    """
    _require_spatial(x, "max_pool")
    return _pool(keras.layers.MaxPooling2D, x, name, pool_size, strides, padding)


@register("avg_pool")
def avg_pool(x, *, name: str, pool_size: int = 2, strides: int | None = None,
             padding: str = "valid"):
    """AveragePooling2D (2x2 stride 2 by default).

    Args:
      x: NHWC input.
      name: block name.
      pool_size: square window side.
      strides: stride (default: `pool_size`).
      padding: 'valid' or 'same'.

    Returns:
      The output tensor.
    """
    _require_spatial(x, "avg_pool")
    return _pool(keras.layers.AveragePooling2D, x, name, pool_size, strides, padding)


@register("global_avg_pool")
def global_avg_pool(x, *, name: str):
    """GlobalAveragePooling2D: [B, H, W, C] -> [B, C].

    Args:
      x: NHWC input.
      name: block name.

    Returns:
      The output tensor.
    """
    _require_spatial(x, "global_avg_pool")
    return keras.layers.GlobalAveragePooling2D(name=f"{name}_gap")(x)


@register("global_max_pool")
def global_max_pool(x, *, name: str):
    """GlobalMaxPooling2D: [B, H, W, C] -> [B, C].

    Args:
      x: NHWC input.
      name: block name.

    Returns:
      The output tensor.
    """
    _require_spatial(x, "global_max_pool")
    return keras.layers.GlobalMaxPooling2D(name=f"{name}_gmp")(x)


# --- Merges ---------------------------------------------------------------------


def _describe(xs):
    return ", ".join(str(tuple(x.shape[1:])) for x in xs)


@register("concat", multi_input=True)
def concat(xs, *, name: str):
    """Concatenates its inputs along channels (their spatial sizes must match).

    Args:
      xs: list of tensors (one tensor is returned as is).
      name: block name.

    Returns:
      The output tensor.

    Raises:
      UserError: the inputs' ranks or spatial sizes differ.
    """
    if len(xs) == 1:
        return xs[0]
    if len({tuple(x.shape[1:-1]) for x in xs}) > 1:
        raise UserError(
            f"cannot concatenate inputs of shapes {_describe(xs)}: all but the channels must "
            "match (add a pooling or strided block on the larger ones).")
    return keras.layers.Concatenate(name=f"{name}_concat")(list(xs))


@register("add", multi_input=True)
def add(xs, *, name: str):
    """Adds its inputs element-wise (their shapes must match, channels included).

    Args:
      xs: list of tensors (one tensor is returned as is).
      name: block name.

    Returns:
      The output tensor.

    Raises:
      UserError: the inputs' shapes differ.
    """
    if len(xs) == 1:
        return xs[0]
    if len({tuple(x.shape[1:]) for x in xs}) > 1:
        raise UserError(
            f"cannot add inputs of shapes {_describe(xs)}: they must be equal (project the "
            "shortcut with a 1x1 conv block, or merge with concatenation).")
    return keras.layers.Add(name=f"{name}_add")(list(xs))


# --- Heads and regularisation --------------------------------------------------------


@register("dropout")
def dropout(x, *, name: str, rate: float):
    """Dropout (active in training only).

    Args:
      x: input tensor.
      name: block name.
      rate: fraction of units dropped.

    Returns:
      The output tensor.
    """
    return keras.layers.Dropout(rate, name=f"{name}_dropout")(x)


@register("dense")
def dense(x, *, name: str, units: int, activation: str | None = None, use_bias: bool = True,
          kernel_initializer: str = "glorot_uniform", l2: float = 0.0):
    """A Dense layer (on NHWC input it acts per position, like a 1x1 conv without BN).

    Args:
      x: input tensor.
      name: block name.
      units: output features.
      activation: Keras activation name, or None (logits).
      use_bias: whether it has a bias.
      kernel_initializer: Keras initializer name.
      l2: L2 weight decay on the kernel.

    Returns:
      The output tensor.
    """
    return keras.layers.Dense(units, activation=activation, use_bias=use_bias,
                              kernel_initializer=kernel_initializer,
                              kernel_regularizer=_l2(l2), name=f"{name}_dense")(x)


@register("classifier")
def classifier(x, *, name: str, units: int, head: str = "dense", pooling: str = "avg",
               dropout_rate: float = 0.0):
    """A classifier head producing logits [B, units].

    head='dense': global pooling (if the input is spatial) -> dropout -> `dense`.
    head='conv': the reference's head, a 1x1 `conv` block (conv -> BN -> ReLU)
    to `units` channels -> dropout -> global pooling.

    Args:
      x: input tensor.
      name: block name.
      units: number of classes.
      head: 'dense' or 'conv'.
      pooling: 'avg' or 'max' global pooling.
      dropout_rate: dropout before the dense layer / the pooling (0: none).

    Returns:
      Logits [B, units].

    Raises:
      UserError: an unknown `head` or `pooling`.
    """
    pools = {"avg": global_avg_pool, "max": global_max_pool}
    if pooling not in pools:
        raise UserError(f"pooling must be 'avg' or 'max', got {pooling!r}.")
    if head not in ("dense", "conv"):
        raise UserError(f"head must be 'dense' or 'conv', got {head!r}.")
    if head == "conv":
        x = conv(x, name=f"{name}_head", filters=units, kernel_size=1)
    elif len(x.shape) == 4:
        x = pools[pooling](x, name=name)
    if dropout_rate:
        x = dropout(x, name=name, rate=dropout_rate)
    if head == "conv":
        return pools[pooling](x, name=name)
    return dense(x, name=name, units=units)


def describe_kinds(markdown=False):
    """One line per block kind, `kind(arguments)  what it is`; or, with `markdown`, the table of
    docs/writing_a_network.md §2 (required arguments in bold, the others with their default)."""
    lines = ["| kind | what it is | arguments |", "|---|---|---|"] if markdown else []
    for kind in sorted(KINDS):
        fn = KINDS[kind].signature_of
        params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("x", "xs", "name")]
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        if markdown:
            arguments = ", ".join(f"**{p.name}**" if p.default is inspect.Parameter.empty else
                                  f"{p.name} {p.default!r}" for p in params) or "none"
            lines.append(f"| `{kind}` | {doc} | {arguments} |")
        else:
            lines.append(f"{kind}({', '.join(['name: str'] + [str(p) for p in params])})\n    {doc}")
    return "\n".join(lines)


def main(argv=None):
    """`python -m trainer.models.blocks --list`: the block kinds, their arguments and one line each."""
    import argparse  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(prog="python -m trainer.models.blocks",
                                     description="The block kinds a network declaration can use.")
    parser.add_argument("--list", action="store_true", help="print every block kind with its arguments")
    parser.add_argument("--markdown", action="store_true", help="the same as a markdown table (the docs' table)")
    args = parser.parse_args(argv)
    if not (args.list or args.markdown):
        parser.print_help()
        return
    from trainer.models import blocks as library  # pylint: disable=import-outside-toplevel,import-self

    print(library.describe_kinds(markdown=args.markdown))


if __name__ == "__main__":
    main()
