"""Builds a Keras network from a gin list of block declarations.

A declaration is a list of dicts, read top to bottom like a design table:

    trainer.network.blocks = [
        {'name': 'stem', 'kind': 'sepconv', 'filters': 32},
        {'name': 's0_dense1', 'kind': 'dense_unit', 'filters': 64},
        ...
        {'name': 's2_dense1', 'kind': 'dense_unit', 'filters': 128, 'inputs': ['T0', 'T1']},
        ...
        {'name': 'pool', 'kind': 'global_avg_pool'},
    ]

Each dict has a unique `name`, a `kind` (see `trainer.models.blocks`) and
that kind's keyword arguments. A block takes the previous block's output,
or `inputs`: a list of earlier block names ('image' is the network input),
merged by concatenation (the default) or by `merge: 'add'`. The network's
output is the last block's, cast to float32 (for mixed precision): it must
be logits [batch, classes].
"""

import dataclasses
import difflib
import inspect
import re

import gin
import keras

from trainer.errors import UserError
from trainer.models import blocks as blocks_lib
from trainer.registry import configurable

INPUT_NAME = "image"
_MERGES = ("concat", "add")
_RESERVED_KEYS = ("name", "kind", "inputs", "merge")


@dataclasses.dataclass
class BuiltBlock:
    """One block of a built network, for the plan.

    Attributes:
      name: the block's name.
      kind: its kind.
      inputs: the tensors it consumed (outputs of earlier blocks or the image).
      output: the tensor it produced.
    """

    name: str
    kind: str
    inputs: list
    output: object


@dataclasses.dataclass
class Network:
    """A built network and its blocks in declaration order."""

    model: keras.Model
    blocks: list


@configurable("trainer", name="network", denylist=["image_size"])
def build_network(image_size: int, blocks, name: str = "network") -> keras.Model:
    """Builds the network declared by `blocks`, inside the gin scope `name`.

    A model file declares both arguments and scopes the block defaults its
    network needs under its name (`small/trainer.blocks.batch_norm.momentum =
    0.9`), so they reach that network's blocks and nothing else.

    Args:
      image_size: side of the square RGB input (float32 in [0, 1]).
      name: the network's name: the Keras model's name and the gin scope its blocks are built in.
      blocks: the declaration (see the module docstring).

    Returns:
      A functional `keras.Model` mapping [B, S, S, 3] images to float32
      logits [B, classes].

    Raises:
      UserError: a malformed declaration or a wiring error, naming the block.
    """
    return assemble(image_size, blocks, name).model


def declared():
    """The declared network's (name, blocks) from gin, without building it.

    Raises:
      UserError: no network is declared.
    """
    bindings = gin.get_bindings("trainer.network")
    if "blocks" not in bindings:
        raise UserError("No network is declared: include a gin/models/*.gin file (it binds trainer.network.name "
                        "and trainer.network.blocks).")
    return bindings.get("name", "network"), bindings["blocks"]


def output_problem(output_shape, num_classes, last_block=None):
    """Why a network's output cannot be logits [batch, num_classes], naming its last block and the fix; or None.

    Args:
      output_shape: the model's output shape, batch included.
      num_classes: NUM_CLASSES.
      last_block: the last block's name (default: the declared network's).
    """
    shape = tuple(output_shape)
    if shape[1:] == (num_classes,):
        return None
    if last_block is None:
        try:
            last_block = declared()[1][-1].get("name", "?")
        except (UserError, AttributeError, IndexError, KeyError, TypeError):
            last_block = "?"
    return (f"The network outputs shape {shape[1:]} per image (its last block: '{last_block}') but it must output "
            f"({num_classes},), one logit per class (NUM_CLASSES = {num_classes}): end the declaration with a "
            "'classifier' block of 'units': %NUM_CLASSES (or a 1x1 'conv' of %NUM_CLASSES filters, then "
            "'global_avg_pool').")


def assemble(image_size: int, blocks, name: str = "network") -> Network:
    """Like `build_network`, but also returns each block's inputs and output.

    Args:
      image_size: side of the square input.
      blocks: the declaration.
      name: the Keras model's name.

    Returns:
      A `Network`.

    Raises:
      UserError: a malformed declaration or a wiring error, naming the block.
    """
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise UserError(
            "trainer.network.blocks must be a non-empty list of block dicts (include a "
            f"gin/models/*.gin file), got {blocks!r}.")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise UserError(f"trainer.network.name must be an identifier (it is the gin scope of the network's "
                        f"block defaults), got {name!r}.")
    with gin.config_scope(name):
        return _assemble(image_size, blocks, name)


def _assemble(image_size, blocks, name):
    image = keras.Input((image_size, image_size, 3), dtype="float32", name=INPUT_NAME)
    outputs = {INPUT_NAME: image}
    built = []
    previous = image
    for index, spec in enumerate(blocks):
        block_name, kind = _check_spec(spec, index, outputs)
        inputs = _resolve_inputs(spec, block_name, outputs, previous)
        with _blame(block_name, kind):
            previous = _call_block(spec, block_name, kind, inputs)
        outputs[block_name] = previous
        built.append(BuiltBlock(block_name, kind, inputs, previous))
    _check_all_used(built)
    last = built[-1]
    if len(previous.shape) != 2:
        raise UserError(
            f"Block '{last.name}' (kind '{last.kind}') is the last block and outputs shape "
            f"{tuple(previous.shape[1:])}; a network must end with logits [batch, classes]: "
            "end it with a 'global_avg_pool' or 'classifier' block.")
    logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(previous)
    try:
        model = keras.Model(image, logits, name=name)
    except ValueError as err:
        raise UserError(_explain_model_error(err, built)) from None
    return Network(model, built)


def _explain_model_error(err, built):
    """Explains Keras's duplicate-layer-name error in terms of block names."""
    message = _one_line(str(err))
    m = re.search(r'The name "([^"]+)" is used', message)
    if not m:
        return f"Cannot assemble the network: {message}"
    layer = m.group(1)
    owners = [b.name for b in built if layer.startswith(b.name)]
    owner = max(owners, key=len) if owners else layer
    return (f"Block '{owner}': its layer name '{layer}' is also used by another block; blocks "
            "name their layers '<block>_<part>', so a block name must not look like another "
            "block's layer: rename one of them.")


def _check_all_used(built):
    """Rejects a block whose output no later block takes (Keras would drop it silently)."""
    used = {id(t) for block in built for t in block.inputs}
    for block, following in zip(built[:-1], built[1:]):
        if id(block.output) not in used:
            raise UserError(
                f"Block '{block.name}' (kind '{block.kind}'): its output is not used: the next "
                f"block '{following.name}' takes other inputs and no later block lists "
                f"'{block.name}' in its 'inputs'.")


def _check_spec(spec, index, outputs):
    """Validates a block dict's name and kind; returns them."""
    if not isinstance(spec, dict):
        raise UserError(f"Block #{index + 1} of trainer.network.blocks must be a dict, got {spec!r}.")
    block_name = spec.get("name")
    if not isinstance(block_name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", block_name):
        raise UserError(
            f"Block #{index + 1} of trainer.network.blocks needs a 'name' made of letters, digits, "
            f"'_', '.' or '-', got {block_name!r} in {spec!r}.")
    if block_name in outputs:
        raise UserError(f"Block '{block_name}': the name is already used by an earlier block "
                        f"(or is the network input '{INPUT_NAME}'); names must be unique.")
    kind = spec.get("kind")
    if kind not in blocks_lib.KINDS:
        known = sorted(blocks_lib.KINDS)
        close = difflib.get_close_matches(str(kind), known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"Block '{block_name}': unknown kind {kind!r}.{hint} "
                        f"Known kinds: {', '.join(known)}.")
    return block_name, kind


def _resolve_inputs(spec, block_name, outputs, previous):
    """The list of tensors a block consumes."""
    names = spec.get("inputs")
    if names is None:
        return [previous]
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not names:
        raise UserError(f"Block '{block_name}': 'inputs' must be a non-empty list of earlier "
                        f"block names, got {spec.get('inputs')!r}.")
    tensors = []
    for input_name in names:
        if input_name not in outputs:
            close = difflib.get_close_matches(str(input_name), list(outputs), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(
                f"Block '{block_name}': unknown input {input_name!r}; inputs must name earlier "
                f"blocks or '{INPUT_NAME}'.{hint}")
        tensors.append(outputs[input_name])
    return tensors


def _call_block(spec, block_name, kind, inputs):
    """Merges the inputs if needed and calls the kind's factory with the spec's kwargs."""
    registered = blocks_lib.KINDS[kind]
    kwargs = {k: v for k, v in spec.items() if k not in _RESERVED_KEYS}
    _check_kwargs(registered, kwargs)
    merge = spec.get("merge", "concat")
    if registered.multi_input:
        if "merge" in spec:
            raise UserError(f"'merge' does not apply to a '{kind}' block: it merges its inputs "
                            "itself.")
        return registered.factory(inputs, name=block_name, **kwargs)
    if merge not in _MERGES:
        raise UserError(f"'merge' must be one of {', '.join(map(repr, _MERGES))}, got {merge!r}.")
    x = blocks_lib.KINDS[merge].factory(inputs, name=f"{block_name}_in")
    output = registered.factory(x, name=block_name, **kwargs)
    _check_output(output)
    return output


def _check_kwargs(registered, kwargs):
    """Rejects kwargs the kind does not take, and required ones that are missing."""
    params = inspect.signature(registered.signature_of).parameters
    accepted = [p for p in params if p not in ("x", "xs", "name")]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown argument {key!r}.{hint} A '{registered.name}' block takes: "
                            f"{', '.join(accepted) or 'no arguments'}.")
    for p in accepted:
        if params[p].default is inspect.Parameter.empty and p not in kwargs \
                and not _gin_bound(registered.name, p):
            raise UserError(f"missing required argument {p!r} (it takes: {', '.join(accepted)}).")


def _gin_bound(kind, param):
    """True if gin binds `param` of the block kind, in the current scope or unscoped."""
    selector = f"{blocks_lib.GIN_MODULE}.{kind}"
    scope = gin.current_scope_str()
    for candidate in ([f"{scope}/{selector}"] if scope else []) + [selector]:
        if param in gin.get_bindings(candidate):
            return True
    return False


def _check_output(output):
    """Rejects an output whose spatial size shrank below 1."""
    if len(output.shape) == 4 and min(output.shape[1:3]) < 1:
        raise UserError(f"the spatial size shrinks below 1 (output shape "
                        f"{tuple(output.shape[1:])}): use fewer downsamplings or a larger image.")


class _blame:  # pylint: disable=invalid-name
    """Context manager turning errors raised while building a block into one-line UserErrors."""

    def __init__(self, block_name, kind):
        self._prefix = f"Block '{block_name}' (kind '{kind}'): "

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        if issubclass(exc_type, UserError):
            raise UserError(self._prefix + _one_line(str(exc))) from None
        if issubclass(exc_type, (ValueError, TypeError)):  # Keras rejecting an argument's value.
            message = _one_line(str(exc))
            if "zero or negative" in message:
                message = "the spatial size shrinks below 1: " + message
            raise UserError(self._prefix + message) from None
        return False


def _one_line(message):
    """Keeps the first paragraph of a Keras or gin error, on one line.

    Drops ANSI escapes, Keras's "Exception encountered when calling X.call()"
    header and "Arguments received" trailer, and the "In call to configurable"
    lines gin appends to exceptions raised inside configurables.
    """
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    message = re.sub(r"Exception encountered when calling \S+\.", "", message)
    message = message.split("Arguments received")[0].split("In call to configurable")[0]
    return " ".join(message.split())
