"""The tf.distribute strategy, selected in gin (gin/strategy/*.gin).

    make_strategy.kind = 'default'        # one device (CPU or one GPU)
    make_strategy.kind = 'mirrored'       # GPUs (or devices) of one machine
    make_strategy.kind = 'multi_worker'   # MultiWorkerMirroredStrategy, cluster from TF_CONFIG
    make_strategy.kind = 'tpu'            # TPUStrategy; make_strategy.tpu = 'name' or 'grpc://...'

Every strategy runs the same training loop (`trainer.train`). With several
replicas, BatchNorm statistics are per replica unless the blocks'
`batch_norm.synchronized = True` (DESIGN.md §3); on CPU logical devices that
needs `make_strategy.cross_device_ops = 'reduction_to_one_device'`
(gin/strategy/mirrored_cpu.gin).
"""

import socket

import gin
import tensorflow as tf

from trainer.errors import UserError

KINDS = ("default", "mirrored", "multi_worker", "tpu")
CROSS_DEVICE_OPS = ("reduction_to_one_device", "nccl", "hierarchical_copy")


@gin.configurable
def make_strategy(kind="default", devices=None, cross_device_ops=None, tpu="", tpu_timeout_seconds=60,
                  logical_cpus=0):
    """Creates the distribution strategy.

    Args:
      kind: one of KINDS.
      devices: MirroredStrategy devices, e.g. ['/gpu:0', '/gpu:1']; None = all GPUs
        (or the CPU when there is none; all logical CPUs with `logical_cpus`).
      cross_device_ops: MirroredStrategy all-reduce: None (TF's choice) or one of
        CROSS_DEVICE_OPS; 'reduction_to_one_device' is needed for synchronized
        BatchNorm over CPU logical devices (DESIGN §3).
      tpu: TPU name or grpc:// address for TPUClusterResolver ('' = the local TPU VM or Colab).
      tpu_timeout_seconds: how long to try to reach a TPU's grpc:// address.
      logical_cpus: if > 1, split the CPU into this many logical devices first
        (to run multi-replica code on a CPU-only machine); only in a process
        where TensorFlow has not started yet.

    Returns:
      A `tf.distribute.Strategy`.

    Raises:
      UserError: an unknown kind or option, no TPU where the TPU strategy was
        asked for, or logical CPUs asked for too late.
    """
    if logical_cpus > 1:
        _split_cpu(logical_cpus)
        if devices is None:
            devices = [f"/cpu:{i}" for i in range(logical_cpus)]
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        if cross_device_ops is not None and cross_device_ops not in CROSS_DEVICE_OPS:
            raise UserError(f"make_strategy.cross_device_ops must be None or one of {list(CROSS_DEVICE_OPS)}, "
                            f"got {cross_device_ops!r}.")
        ops = {
            None: lambda: None,
            "reduction_to_one_device": tf.distribute.ReductionToOneDevice,
            "nccl": tf.distribute.NcclAllReduce,
            "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce,
        }[cross_device_ops]()
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=ops)
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "tpu":
        return tf.distribute.TPUStrategy(_connect_tpu(tpu, tpu_timeout_seconds))
    raise UserError(f"make_strategy.kind must be one of {', '.join(KINDS)}; got {kind!r}.")


def _split_cpu(count):
    """Splits the first CPU into `count` logical devices (before TensorFlow starts)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        raise UserError(f"make_strategy.logical_cpus = {count} must take effect before TensorFlow starts, "
                        "but it has already started in this process (run the trainer in a fresh process, "
                        "e.g. python -m trainer.main).") from None


def _connect_tpu(tpu, timeout_seconds):
    """Resolves, reaches and initialises the TPU; a clear UserError when there is none.

    Returns:
      The `TPUClusterResolver`.
    """
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        master = resolver.master()
        if master.startswith("grpc://"):  # TF would wait for an unreachable address forever.
            host, port = master[len("grpc://"):].rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=timeout_seconds).close()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as err:  # pylint: disable=broad-except - any failure here means "no TPU".
        reason = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
        raise UserError(
            f"The TPU strategy was selected (make_strategy.kind = 'tpu', tpu = {tpu!r}) but no TPU "
            f"could be reached: {reason}. On a Cloud TPU VM or in Colab leave tpu = ''; elsewhere give "
            "the TPU's name or its grpc:// address, or include gin/strategy/default.gin to run on "
            "this machine.") from None
    return resolver
