"""The plan of a declared network: per block shape, stride, receptive field, parameters, MACs.

It replaces the reference author's design spreadsheet. The network is built
(graph only, nothing runs) and its layers are walked block by block:

- receptive field (RF) and jump follow the standard recurrence, per layer:
  RF += (k_eff - 1) * jump, then jump *= stride, with k_eff = d * (k - 1) + 1
  for a kernel k dilated by d; where inputs merge, RF and jump are the
  maxima over the inputs. Pooling windows count like kernels. Global pooling
  and dense layers pass the RF of their input through, so the RF "at the
  output" is that of the last spatial feature map (each logit also averages
  over all its positions). Non-square kernels use their larger side.
- MACs are the multiply-accumulates of convolutions and dense layers for one
  image (biases, BatchNorm, activations and pooling are not counted). A layer
  of any other type is named in a "Not counted" line: its MACs are unknown,
  not zero.
- parameters are Keras's own counts, split trainable / non-trainable.
"""

import dataclasses
import os

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer.errors import UserError
from trainer.models import builder


@dataclasses.dataclass
class Row:
    """One block of the plan."""

    name: str
    kind: str
    output_shape: tuple
    stride: float
    jump: int
    rf: int
    params: int
    trainable: int
    non_trainable: int
    macs: int
    activations: int = 0  # Values of the block's layer outputs for one image (kept for the backward pass).
    uncounted: tuple = ()  # 'layer (Type)' of layers whose MACs the plan cannot count (not in `macs`).


@dataclasses.dataclass
class Totals:
    """Whole-network figures."""

    params: int
    trainable: int
    non_trainable: int
    macs: int
    rf: int
    image_size: int
    activations: int = 0


@dataclasses.dataclass
class Plan:
    """The plan: rows in declaration order, then totals."""

    rows: list
    totals: Totals


def make_plan(image_size: int, blocks=None) -> Plan:
    """Builds the declared network at `image_size` and measures it block by block.

    Args:
      image_size: side of the square input.
      blocks: a declaration; None takes the declared network (`trainer.network`).

    Returns:
      A `Plan`.

    Raises:
      UserError: no declaration is bound, or it does not build.
    """
    name = "network"
    if blocks is None:
        name, blocks = builder.declared()
    network = builder.assemble(image_size, blocks, name=name)
    stats = {id(network.model.inputs[0]): (1, 1)}
    rows = []
    for block in network.blocks:
        ops = _operations_of(block)
        for op, node in ops:
            _propagate(op, node, stats)
        _, jump_in = _merge_stats(block.inputs, stats)
        rf, jump = stats[id(block.output)]
        trainable = sum(_count(op.trainable_weights) for op, _ in ops)
        non_trainable = sum(_count(op.non_trainable_weights) for op, _ in ops)
        rows.append(Row(
            name=block.name, kind=block.kind, output_shape=tuple(block.output.shape[1:]),
            stride=jump / jump_in, jump=jump, rf=rf, params=trainable + non_trainable,
            trainable=trainable, non_trainable=non_trainable,
            macs=sum(_macs(op, node) or 0 for op, node in ops),
            activations=sum(_values(node.output_tensors) for _, node in ops),
            uncounted=tuple(f"{op.name} ({type(op).__name__})" for op, node in ops if _macs(op, node) is None)))
    totals = Totals(
        params=sum(r.params for r in rows), trainable=sum(r.trainable for r in rows),
        non_trainable=sum(r.non_trainable for r in rows), macs=sum(r.macs for r in rows),
        rf=rows[-1].rf, image_size=image_size, activations=sum(r.activations for r in rows))
    return Plan(rows, totals)


DEFAULT_IMAGE_SIZE = 64


def default_image_size() -> int:
    """The bound IMAGE_SIZE macro, else 64 (Tiny ImageNet's native size)."""
    try:
        return int(gin.query_parameter("%IMAGE_SIZE"))
    except ValueError:
        return DEFAULT_IMAGE_SIZE


def plan_text(image_size: int, blocks=None) -> str:
    """The plan as a markdown table and totals (for the terminal and TensorBoard).

    Args:
      image_size: side of the square input.
      blocks: a declaration; None takes the declared network (`trainer.network`).

    Returns:
      Markdown text.
    """
    return format_plan(make_plan(image_size, blocks))


def format_plan(plan: Plan) -> str:
    """Renders a `Plan` as an aligned markdown table, then the totals as a list."""
    header = ["block", "kind", "output", "stride", "jump", "RF", "params", "MACs"]
    body = [[r.name, r.kind, "x".join(str(d) for d in r.output_shape), _format_stride(r.stride),
             str(r.jump), str(r.rf), f"{r.params:,}", f"{r.macs:,}"] for r in plan.rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    right = {3, 4, 5, 6, 7}

    def line(cells):
        padded = [c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i in right else "-")
                          for i, w in enumerate(widths)) + "|"
    t = plan.totals
    coverage = "covers" if t.rf >= t.image_size else "does not cover"
    totals = [
        f"- Parameters: {t.params:,} (trainable {t.trainable:,}, non-trainable {t.non_trainable:,})",
        f"- MACs per image: {t.macs:,} ({_short(t.macs)}) at {t.image_size}x{t.image_size}",
        f"- Receptive field at the output: {t.rf} px for a {t.image_size} px image "
        f"({coverage} the whole image; {t.rf / t.image_size:.2f}x its side)",
    ]
    uncounted = [layer for r in plan.rows for layer in r.uncounted]
    if uncounted:
        totals.append(f"- Not counted: the MACs of {len(uncounted)} layer(s) of a type the plan does not know: "
                      f"{', '.join(uncounted[:5])}{', ...' if len(uncounted) > 5 else ''}; the MACs above leave "
                      "them out")
    totals += memory_lines(plan)
    problem = output_problem(plan)
    if problem:
        totals.append(f"- Output: {problem}")
    return "\n".join([line(header), rule] + [line(b) for b in body] + [""] + totals) + "\n"


@dataclasses.dataclass
class Memory:
    """An estimate of the memory training takes, in bytes."""

    per_image: int  # Activations kept for the backward pass (every layer's output, with their gradients).
    fixed: int  # Weights, their gradients and the optimizer's state.

    def at(self, batch_size):
        return self.fixed + batch_size * self.per_image

    def largest_batch(self, available):
        """The largest batch whose estimate fits in `available` bytes (0 if none)."""
        return max(0, int((available - self.fixed) // self.per_image)) if self.per_image else 1 << 20


# Measured with `python benchmarks/network_memory.py` (BUILD_NOTES.md, issue 17): training on CPU at 64 px, peak
# resident memory above the process's before the network is built. The reference network at batch 4 peaked at
# 4.41 GB against this estimate's 3.38 GB (1.31x; 2.45 GB against 1.77 GB at batch 2), DenseNet-BC at batch 2 at
# 1.06 GB against 0.56 GB (1.88x), small at batch 2 at 0.08 GB against 0.01 GB (8.7x). Per image the peak grows by
# at most 1.28x the estimate's per-image part (the reference, 1.03 GB an image against 0.80 GB from batch 4 to 8);
# what does not grow with the batch (TensorFlow's runtime: the traced step, kernels' workspace) exceeds 1.3x the
# estimate by at most 0.33 GB (DenseNet-BC at batch 2). So the check before training counts the estimate times
# MEASURED_RATIO plus RUNTIME_ALLOWANCE: a ratio alone would have to be 8.7 to cover the small network.
MEASURED_RATIO = 1.3
RUNTIME_ALLOWANCE = 400 * 2**20


def counted_memory(memory, replicas=1):
    """What the check before training counts for a `Memory` estimate: times MEASURED_RATIO plus RUNTIME_ALLOWANCE
    (every replica holds its copy of the fixed part)."""
    return Memory(int(memory.per_image * MEASURED_RATIO),
                  int((memory.fixed * MEASURED_RATIO + RUNTIME_ALLOWANCE) * replicas))


def training_memory(plan: Plan, bytes_per_value=4, optimizer_slots=2) -> Memory:
    """Estimates training memory: every layer's output, kept for the backward pass; weights, their gradients
    and `optimizer_slots` values per trainable weight (Adam: 2).

    It leaves out the gradients in flight, TensorFlow's workspace and the decoded dataset: a lower bound, good
    to a factor of about 2.
    """
    t = plan.totals
    return Memory(per_image=t.activations * bytes_per_value,
                  fixed=(t.params + t.trainable * (1 + optimizer_slots)) * bytes_per_value)


def memory_lines(plan: Plan):
    """The plan's lines about training memory (at BATCH_SIZE when it is bound)."""
    memory = training_memory(plan)
    lines = [f"- Training memory (estimate, float32, Adam): {format_bytes(memory.per_image)} per image (activations "
             f"kept for the backward pass), {format_bytes(memory.fixed)} for weights, gradients and optimizer state"]
    try:
        batch_size = gin.query_parameter("%BATCH_SIZE")
    except ValueError:
        batch_size = None
    if isinstance(batch_size, int) and batch_size > 0:
        lines[0] += f"; {format_bytes(memory.at(batch_size))} per batch of {batch_size}"
    lines.append("- Measured (`python benchmarks/network_memory.py`, CPU, 64 px): the reference network at batch 4 "
                 "peaked at 4.41 GB against an estimate of 3.38 GB (1.31x), DenseNet-BC at batch 2 at 1.06 GB against "
                 f"0.56 GB; the check before training counts {MEASURED_RATIO}x this estimate plus "
                 f"{format_bytes(RUNTIME_ALLOWANCE)}, plus the decoded data")
    return lines


def format_bytes(n):
    for scale, unit in ((2**30, "GB"), (2**20, "MB"), (2**10, "KB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _values(tensors):
    return sum(int(np.prod([d or 1 for d in t.shape[1:]])) for t in tensors)


def output_problem(plan: Plan):
    """When NUM_CLASSES is bound and the last block does not output one logit per class: why, and the fix."""
    try:
        num_classes = gin.query_parameter("%NUM_CLASSES")
    except ValueError:
        return None
    if not isinstance(num_classes, int) or not plan.rows:
        return None
    last = plan.rows[-1]
    return builder.output_problem((None,) + tuple(last.output_shape), num_classes, last.name)


def _short(count):
    """1234567 -> '1.23 M'."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)


def _format_stride(stride):
    return str(int(stride)) if float(stride).is_integer() else f"{stride:g}"


def _operations_of(block):
    """The (layer, node) pairs a block made, in topological order."""
    stop = {id(t) for t in block.inputs}
    ordered, done = [], set()
    stack = [(block.output, False)]
    while stack:
        tensor, expanded = stack.pop()
        if id(tensor) in stop:
            continue
        op, node_index, _ = tensor._keras_history  # pylint: disable=protected-access
        if id(op) in done:
            continue
        node = op._inbound_nodes[node_index]  # pylint: disable=protected-access
        if expanded:
            done.add(id(op))
            ordered.append((op, node))
            continue
        stack.append((tensor, True))
        stack.extend((parent, False) for parent in node.input_tensors)
    return ordered


def _merge_stats(tensors, stats):
    """(RF, jump) where tensors merge: the maxima over them."""
    return (max(stats[id(t)][0] for t in tensors), max(stats[id(t)][1] for t in tensors))


def _window(op):
    """(effective kernel, stride) of a layer that has a spatial window, else None."""
    if isinstance(op, (keras.layers.Conv2D, keras.layers.SeparableConv2D,
                       keras.layers.DepthwiseConv2D)):
        kernel = max(d * (k - 1) + 1 for k, d in zip(op.kernel_size, op.dilation_rate))
        return kernel, max(op.strides)
    if isinstance(op, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        return max(op.pool_size), max(op.strides)
    return None


def _propagate(op, node, stats):
    """Sets (RF, jump) of a layer's outputs from its inputs'."""
    rf, jump = _merge_stats(node.input_tensors, stats)
    window = _window(op)
    if window:
        kernel, stride = window
        rf, jump = rf + (kernel - 1) * jump, jump * stride
    for t in node.output_tensors:
        stats[id(t)] = (rf, jump)


# Layers without multiply-accumulates the plan counts (normalisation, activations, pooling, merges, reshapes).
_NO_MACS = (keras.layers.BatchNormalization, keras.layers.Activation, keras.layers.ReLU, keras.layers.Dropout,
            keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D,
            keras.layers.GlobalMaxPooling2D, keras.layers.Concatenate, keras.layers.Add, keras.layers.InputLayer,
            keras.layers.Flatten, keras.layers.Reshape, keras.layers.ZeroPadding2D, keras.layers.Softmax)


def _macs(op, node):
    """Multiply-accumulates of one layer for one image; None for a layer type the plan does not know."""
    in_shape = node.input_tensors[0].shape
    out_shape = node.output_tensors[0].shape
    positions = int(np.prod(out_shape[1:-1]))
    if isinstance(op, keras.layers.SeparableConv2D):
        kernel = int(np.prod(op.kernel_size))
        depthwise = in_shape[-1] * op.depth_multiplier
        return positions * (kernel * depthwise + depthwise * out_shape[-1])
    if isinstance(op, keras.layers.DepthwiseConv2D):
        return positions * int(np.prod(op.kernel_size)) * out_shape[-1]
    if isinstance(op, keras.layers.Conv2D):
        return positions * int(np.prod(op.kernel_size)) * (in_shape[-1] // op.groups) * out_shape[-1]
    if isinstance(op, keras.layers.Dense):
        return positions * in_shape[-1] * out_shape[-1]
    return 0 if isinstance(op, _NO_MACS) else None


def _count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def _cgroup_room():
    """(bytes, where) the process's cgroup still allows (v2, else v1), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(int(limit) - usage, 0), f"left under the cgroup memory limit ({limit_file})"
    return None


def _address_space_room():
    """(bytes, where) `ulimit -v` still allows this process, or None without a limit."""
    import resource  # pylint: disable=import-outside-toplevel

    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm", encoding="ascii") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return max(soft - used, 0), "left under the address-space limit (ulimit -v)"


def available_memory(host=False):
    """(bytes available, where) for training, or (None, None) when unknown.

    The least of the host's available RAM, what the process's cgroup memory
    limit leaves and what `ulimit -v` leaves.

    Args:
      host: the host's memory even with an accelerator (the decoded data lives there); else
        (None, None) with an accelerator: its memory is not checked.
    """
    if not host and (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")):
        return None, None
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append((int(line.split()[1]) * 1024, "host RAM available (/proc/meminfo)"))
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host RAM available"))
        except (ValueError, OSError, AttributeError):
            pass
    found += [room for room in (_cgroup_room(), _address_space_room()) if room]
    return min(found) if found else (None, None)


def check_memory(network_plan, data, replicas, num_pipelines=1):
    """Stops before the first step (and before any decoding) when the memory estimate exceeds what is available.

    The estimate is the network's (activations, weights, gradients, optimizer
    state) plus the decoded training images when they are held in memory, or
    the shuffle buffer's images when they are streamed. Warns when close.

    Raises:
      UserError: naming the estimate, what is available and a batch size that fits.
    """
    from trainer.data import pipeline  # pylint: disable=import-outside-toplevel

    available, where = available_memory()
    if not available:
        return
    memory = counted_memory(training_memory(network_plan), replicas)
    in_memory, _ = data.memory_mode(num_pipelines)
    image_bytes = data.image_size ** 2 * 3
    data_bytes = int(pipeline.DECODE_PEAK_FACTOR * (data.decoded_bytes(num_pipelines) if in_memory else
                                           min(data.shuffle_buffer, data.pipeline_images(num_pipelines)) * image_bytes))
    need = memory.at(data.batch_size) + data_bytes
    estimate = (f"about {format_bytes(need)} at BATCH_SIZE {data.batch_size} (estimate: "
                f"{format_bytes(memory.per_image)} an image of activations kept for the backward pass, "
                f"{format_bytes(memory.fixed)} of weights, gradients and optimizer state, "
                f"{format_bytes(data_bytes)} of decoded images {'in memory' if in_memory else 'in the shuffle buffer'}"
                f"; `python -m trainer.plan` shows the network's part)")
    if need > available:
        fits = max(memory.largest_batch(available - data_bytes), 0) // replicas * replicas
        fix = (f"use BATCH_SIZE = {fits} or less" if fits >= max(1, replicas) else
               "even the smallest batch does not fit: use a smaller IMAGE_SIZE or network")
        if in_memory and data_bytes > available / 4:
            fix += " or stream the data (trainer.data.in_memory = False)"
        raise UserError(f"Training needs {estimate} but only {format_bytes(available)} of {where} is free: "
                        f"{fix}. (trainer.train.check_memory = False skips this check.)")
    if need > 0.7 * available:
        logging.warning("Training needs %s, close to the %s of %s: it may run out of memory.", estimate,
                        format_bytes(available), where)
