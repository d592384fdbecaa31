"""The policy language: a string over the op registry, parsed into one op, and the combinators.

A policy is a string over the registry, parsed with `ast` (only registered
names, literal arguments and nested ops; nothing is evaluated):

    flip(0.5) | zoom(0.5, 1.5) | channel_shuffle() | coarse_dropout(0.2, 0.02)

`a | b` applies `a` then `b`; the combinators are `sequential(...)`,
`sometimes(p, then, otherwise=None)`, `one_of(...)` and `random_order(...)`,
all deciding per image.

Op factories check their arguments with the helpers here (`number`,
`number_range`, `pair`, `choice`, `op_argument`), which raise a UserError
naming the op and the argument; `build_policy` adds the policy string.
"""

import ast
import difflib
import importlib
import inspect
import math

import tensorflow as tf

from trainer.data.augment.engine import Batch, Op, both, split, uniform
from trainer.errors import UserError

REGISTRY = {}


def register(name):
    """Class decorator: registers an op factory under `name` for policy strings.

    Args:
      name: the name used in policy strings, e.g. 'flip'.

    Returns:
      The decorator, which returns the factory unchanged.

    Raises:
      ValueError: `name` is already registered.
    """
    def decorator(factory):
        if name in REGISTRY:
            raise ValueError(f"augmentation op {name!r} is registered twice")
        REGISTRY[name] = factory
        return factory
    return decorator


# ----------------------------------------------------------------------------
# Policy strings.


def build_policy(spec):
    """Parses a policy string into one callable op.

    Args:
      spec: e.g. "flip(0.5) | rotate(-45, 45)"; None or blank for no augmentation.

    Returns:
      An `Op` (`op(images, labels, seed) -> (images, labels)`), or None.

    Raises:
      UserError: a syntax error, an unknown op (with the nearest registered
        name), an argument that is not a literal, or a bad argument value.
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise UserError(f"An augmentation policy must be a string such as "
                        f"\"flip(0.5) | rotate(-45, 45)\", got {spec!r} ({type(spec).__name__}).")
    if not spec.strip():
        return None
    importlib.import_module(__package__).load()  # Every op module registered, however this module was imported.
    try:
        tree = ast.parse(f"(\n{spec.strip()}\n)", mode="eval")  # Parentheses allow line breaks.
    except SyntaxError as err:
        raise UserError(f"Augmentation policy {spec!r} is not a valid expression ({err.msg}). "
                        f"Expected op calls joined by '|', e.g. \"flip(0.5) | rotate(-45, 45)\"; "
                        f"known ops: {', '.join(sorted(REGISTRY))}.") from None
    return _build(tree.body, spec)


def _build(node, spec):
    """Builds the op an AST node describes (a call, a bare op name, or `a | b`)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        ops = []
        for side in (node.left, node.right):
            op = _build(side, spec)
            ops.extend(op.ops if type(op) is Sequential else [op])  # pylint: disable=unidiomatic-typecheck
        return Sequential(*ops)
    if isinstance(node, ast.Name):
        return _make(node.id, [], {}, spec)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = [_argument(a, node.func.id, spec) for a in node.args]
        kwargs = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise UserError(f"Augmentation op '{node.func.id}' in policy {spec!r}: "
                                f"'**' arguments are not supported; write name=value.")
            kwargs[keyword.arg] = _argument(keyword.value, node.func.id, spec)
        return _make(node.func.id, args, kwargs, spec)
    raise UserError(f"Augmentation policy {spec!r}: expected an op call such as 'flip(0.5)', "
                    f"got '{_source(node, spec)}'. Known ops: {', '.join(sorted(REGISTRY))}.")


def _argument(node, op_name, spec):
    """An op argument: a nested op, or a Python literal (number, string, tuple, bool, None)."""
    if isinstance(node, ast.Name) and node.id not in REGISTRY:
        close = difflib.get_close_matches(node.id, REGISTRY, n=1, cutoff=0.5)
        hint = f" (did you mean the op '{close[0]}'?)" if close else ""
        raise UserError(f"Augmentation op '{op_name}' in policy {spec!r}: argument '{node.id}' is "
                        f"neither a literal nor a known op{hint}; strings need quotes, e.g. "
                        f"fill='constant'.")
    if isinstance(node, (ast.Call, ast.Name)) or (
            isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)):
        return _build(node, spec)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise UserError(f"Augmentation op '{op_name}' in policy {spec!r}: argument "
                        f"'{_source(node, spec)}' must be a literal (number, string, tuple, "
                        f"True/False/None) or an op.") from None


def _make(name, args, kwargs, spec):
    """Calls the registered factory `name`, turning every mistake into a UserError."""
    factory = REGISTRY.get(name)
    if factory is None:
        close = difflib.get_close_matches(name, REGISTRY, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"Unknown augmentation op '{name}' in policy {spec!r}.{hint} "
                        f"Known ops: {', '.join(sorted(REGISTRY))}.")
    signature = inspect.signature(factory)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        raise UserError(f"Augmentation op '{name}' in policy {spec!r}: {err}. "
                        f"Expected {name}{signature}.") from None
    try:
        return factory(*args, **kwargs)
    except ArgumentError as err:
        raise UserError(f"Augmentation op '{err.op}' in policy {spec!r}: {err.detail}") from None


def _source(node, spec):
    return ast.get_source_segment(f"(\n{spec.strip()}\n)", node) or ast.dump(node)


# ----------------------------------------------------------------------------
# Argument checks: factories raise UserError naming the op and the argument.


class ArgumentError(UserError):
    """A bad argument value, raised by an op factory; `build_policy` adds the policy string."""

    def __init__(self, op, detail):
        super().__init__(f"Augmentation op '{op}': {detail}")
        self.op, self.detail = op, detail


def fail(op, message):
    """Raises an ArgumentError: op `op` got a bad argument, described by `message`."""
    raise ArgumentError(op, message)


def number(op, name, value, lo=-math.inf, hi=math.inf, integer=False):
    """Returns `value` as a float (or int) after checking type and lo <= value <= hi."""
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        bounds = f" in [{lo}, {hi}]" if math.isfinite(lo) or math.isfinite(hi) else ""
        fail(op, f"{name} must be {'an integer' if integer else 'a number'}{bounds}, got {value!r}.")
    return value if integer else float(value)


def number_range(op, names, lo, hi, minimum=-math.inf, maximum=math.inf):
    """Checks a (lo, hi) pair of numbers with minimum <= lo <= hi <= maximum."""
    lo = number(op, names[0], lo, minimum, maximum)
    hi = number(op, names[1], hi, minimum, maximum)
    if lo > hi:
        fail(op, f"{names[0]} must be <= {names[1]}, got {names[0]}={lo}, {names[1]}={hi}.")
    return lo, hi


def pair(op, name, value, minimum=0.0):
    """Checks a (lo, hi) tuple argument such as scale=(0.08, 1.0)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        fail(op, f"{name} must be a pair (lo, hi), got {value!r}.")
    return number_range(op, (f"{name}[0]", f"{name}[1]"), value[0], value[1], minimum)


def flag(op, name, value):
    """Returns `value` after checking that it is True or False."""
    if not isinstance(value, bool):
        fail(op, f"{name} must be True or False, got {value!r}.")
    return value


def choice(op, name, value, choices):
    """Returns `value` after checking that it is one of `choices`."""
    if value not in choices:
        fail(op, f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def op_argument(op, name, value, optional=False):
    """Returns `value` after checking that it is an op (or None, if `optional`)."""
    if (value is None and optional) or isinstance(value, Op):
        return value
    return fail(op, f"{name} must be an op such as flip(0.5), got {value!r}.")


# ----------------------------------------------------------------------------
# Combinators.


def _apply_disjoint(batch, branches, active):
    """Applies (op, seed, chosen) branches that act on disjoint images.

    Their order does not matter, so geometric branches go first and fuse into
    the pending warp with the ops before them. A single cheap pixel branch
    runs masked over the whole batch; several pixel branches, or a heavy one,
    run each on its own images only (partitioned, then stitched back), so
    one_of over ten colour ops costs about one op, not ten. A mixing op
    (mixup, cutmix) in a partitioned branch finds partners among its own
    images.
    """
    geometric = [b for b in branches if b[0].geometric]
    pixel = [b for b in branches if not b[0].geometric]
    for op, seed, chosen in geometric:
        op.apply(batch, seed, both(active, chosen))
    if len(pixel) > 1 or (pixel and pixel[0][0].heavy):
        _apply_partitioned(batch, pixel, active)
    else:
        for op, seed, chosen in pixel:
            op.apply(batch, seed, both(active, chosen))


def _apply_partitioned(batch, branches, active):
    """Applies each (op, seed, chosen) branch to the images it chose, as a batch of its own."""
    batch.flush()
    parts = len(branches) + 1  # Part 0: images no branch chose.
    ids = tf.zeros([batch.size], tf.int32)
    for k, (_, _, chosen) in enumerate(branches):
        ids = tf.where(both(active, chosen), k + 1, ids)
    positions = tf.dynamic_partition(tf.range(batch.size), ids, parts)
    images = tf.dynamic_partition(batch.images, ids, parts)
    labels = tf.dynamic_partition(batch.labels, ids, parts)
    for k, (op, seed, _) in enumerate(branches):
        part = Batch(images[k + 1], labels[k + 1], batch.unbounded)
        op.apply(part, seed, None)
        part.flush()
        images[k + 1], labels[k + 1] = part.images, part.labels
        batch.unbounded = batch.unbounded or part.unbounded
    stitched = tf.dynamic_stitch(positions, images)
    stitched.set_shape(batch.images.shape)
    batch.images = stitched
    batch.labels = tf.reshape(tf.dynamic_stitch(positions, labels), tf.shape(batch.labels))


class _OpList(Op):
    """A combinator over a list of ops (sequential, one_of, random_order): one constructor for all."""

    name = None  # The registered name, for error messages.

    def __init__(self, *ops):
        if not ops:
            fail(self.name, "needs at least one op.")
        self.ops = tuple(op_argument(self.name, f"argument {i + 1}", op) for i, op in enumerate(ops))
        self.geometric = all(op.geometric for op in self.ops)
        self.heavy = any(op.heavy for op in self.ops)


@register("sequential")
class Sequential(_OpList):
    """Applies its ops one after the other (what `a | b` builds).

    Args:
      *ops: the ops, in order.
    """

    name = "sequential"

    def apply(self, batch, seed, active):
        for i, op in enumerate(self.ops):
            op.apply(batch, tf.random.experimental.stateless_fold_in(seed, i), active)


@register("sometimes")
class Sometimes(Op):
    """Per image, with probability p applies `then`, else `otherwise` (imgaug Sometimes).

    Args:
      p: probability of `then`.
      then: an op.
      otherwise: an op, or None for nothing.
    """

    def __init__(self, p, then, otherwise=None):
        self.p = number("sometimes", "p", p, 0.0, 1.0)
        self.then = op_argument("sometimes", "then", then)
        self.otherwise = op_argument("sometimes", "otherwise", otherwise, optional=True)
        self.geometric = self.then.geometric and (otherwise is None or otherwise.geometric)
        self.heavy = self.then.heavy or (otherwise is not None and otherwise.heavy)

    def apply(self, batch, seed, active):
        seeds = split(seed, 3)
        chosen = uniform(seeds[0], [batch.size]) < self.p
        branches = [(self.then, seeds[1], chosen)]
        if self.otherwise is not None:
            branches.append((self.otherwise, seeds[2], tf.logical_not(chosen)))
        _apply_disjoint(batch, branches, active)


@register("one_of")
class OneOf(_OpList):
    """Per image, applies one of its ops chosen uniformly (imgaug OneOf).

    Args:
      *ops: the candidates.
    """

    name = "one_of"

    def apply(self, batch, seed, active):
        seeds = split(seed, len(self.ops) + 1)
        which = tf.random.stateless_uniform([batch.size], seeds[0], minval=0, maxval=len(self.ops),
                                            dtype=tf.int32)
        _apply_disjoint(batch, [(op, seeds[i + 1], tf.equal(which, i)) for i, op in enumerate(self.ops)],
                        active)


@register("random_order")
class RandomOrder(_OpList):
    """Applies all its ops, in a random order per image (imgaug Sequential(random_order=True)).

    Vectorised as n rounds; in round k each op runs on the images that put it
    k-th (geometric ops fuse into the warp, pixel ops run on their own images).

    Args:
      *ops: the ops.
    """

    name = "random_order"

    def apply(self, batch, seed, active):
        seeds = split(seed, len(self.ops) + 1)
        order = tf.argsort(uniform(seeds[0], [batch.size, len(self.ops)]), axis=1)
        for position in range(len(self.ops)):
            _apply_disjoint(batch, [(op, seeds[i + 1], tf.equal(order[:, position], i))
                                    for i, op in enumerate(self.ops)], active)
