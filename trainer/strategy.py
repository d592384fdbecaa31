"""The tf.distribute strategy, chosen in gin (gin/strategy/*.gin) by reference:

    trainer.train.strategy = @trainer.strategy.default       # one device (CPU or one GPU)
    trainer.train.strategy = @trainer.strategy.mirrored      # the GPUs (or devices) of one machine
    trainer.train.strategy = @trainer.strategy.multi_worker  # several machines, cluster from TF_CONFIG
    trainer.train.strategy = @trainer.strategy.tpu           # a Cloud TPU

A strategy file binds that reference and its own arguments, scoped under the
file's name, so including a second strategy file replaces the first whole.
Every strategy runs the same training loop. Whether BatchNorm computes its
statistics over the global batch (`synchronized_batch_norm`) is a strategy
setting: with several replicas, per-replica statistics change the loss
(docs/decisions.md §6).
"""

import dataclasses
import socket

import tensorflow as tf

from trainer.errors import UserError
from trainer.registry import configurable

CROSS_DEVICE_OPS = ("reduction_to_one_device", "nccl", "hierarchical_copy")


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A strategy and what the trainer needs to know about it.

    Attributes:
      strategy: the `tf.distribute.Strategy`.
      synchronized_batch_norm: BatchNorm statistics over all replicas.
      chief: this process writes the model directory.
      task_id: this worker's index (0 on a single machine).
      multi_worker: MultiWorkerMirroredStrategy (SIGTERM goes through its preemption handler).
      steps_per_execution: training steps per call from the host that suit this strategy.
      name: the gin configurable that made it ('default', 'mirrored', 'multi_worker', 'tpu').
    """

    strategy: tf.distribute.Strategy
    synchronized_batch_norm: bool = False
    chief: bool = True
    task_id: int = 0
    multi_worker: bool = False
    steps_per_execution: int = 10
    name: str = "default"

    def describe(self):
        """'mirrored (tf.distribute.MirroredStrategy), 2 replicas': the banner's words."""
        replicas = self.strategy.num_replicas_in_sync
        kind = type(self.strategy).__name__
        kind = "one device, no tf.distribute strategy" if kind.startswith("_") else f"tf.distribute.{kind}"
        return f"{self.name} ({kind}), {replicas} replica{'s' if replicas != 1 else ''}"


@configurable("trainer.strategy")
def default():
    """One device: the CPU, or the first GPU when there is one.

    Returns:
      A `Distribution`.
    """
    return Distribution(tf.distribute.get_strategy())


@configurable("trainer.strategy")
def mirrored(devices=None, cross_device_ops=None, logical_cpus=0, synchronized_batch_norm=True):
    """MirroredStrategy: the replicas of one machine; the global batch is split over them.

    Args:
      devices: e.g. ['/gpu:0', '/gpu:1']; None = all GPUs (or the CPU when there is
        none; all logical CPUs with `logical_cpus`).
      cross_device_ops: the all-reduce: None (TF's choice) or one of CROSS_DEVICE_OPS;
        synchronized BatchNorm over CPU logical devices needs 'reduction_to_one_device'.
      logical_cpus: if > 1, split the CPU into this many logical devices first (to run
        several replicas on a CPU-only machine; only before TensorFlow has started).
      synchronized_batch_norm: BatchNorm statistics over the global batch.

    Returns:
      A `Distribution`.
    """
    if logical_cpus > 1:
        _split_cpu(logical_cpus)
        if devices is None:
            devices = [f"/cpu:{i}" for i in range(logical_cpus)]
    if cross_device_ops is not None and cross_device_ops not in CROSS_DEVICE_OPS:
        raise UserError(f"trainer.strategy.mirrored.cross_device_ops must be None or one of "
                        f"{list(CROSS_DEVICE_OPS)}, got {cross_device_ops!r}.")
    ops = {
        None: lambda: None,
        "reduction_to_one_device": tf.distribute.ReductionToOneDevice,
        "nccl": tf.distribute.NcclAllReduce,
        "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce,
    }[cross_device_ops]()
    return Distribution(tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=ops),
                        synchronized_batch_norm=synchronized_batch_norm, name="mirrored")


@configurable("trainer.strategy")
def multi_worker(synchronized_batch_norm=True):
    """MultiWorkerMirroredStrategy over the cluster in TF_CONFIG; worker 0 (or the chief) writes the model dir.

    Args:
      synchronized_batch_norm: BatchNorm statistics over the global batch (without it the
        workers' moving statistics drift apart and only the chief's are saved).

    Returns:
      A `Distribution`.
    """
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    resolver = strategy.cluster_resolver
    chief = True
    if resolver is not None and resolver.task_type:
        chief = resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                                  and "chief" not in resolver.cluster_spec().as_dict())
    return Distribution(strategy, synchronized_batch_norm=synchronized_batch_norm, chief=chief,
                        task_id=getattr(resolver, "task_id", 0) or 0, multi_worker=True, name="multi_worker")


@configurable("trainer.strategy")
def tpu(address="", timeout_seconds=60, synchronized_batch_norm=False, steps_per_execution=100):
    """TPUStrategy on a Cloud TPU.

    Args:
      address: the TPU's name or grpc:// address ('' = the local TPU VM or Colab).
      timeout_seconds: how long to try to reach a grpc:// address.
      synchronized_batch_norm: BatchNorm statistics over all cores (the reference's
        TPU v2-8 computed them per core: over 1/8 of the batch).
      steps_per_execution: steps per call from the host (a TPU runs them without returning).

    Returns:
      A `Distribution`.
    """
    return Distribution(tf.distribute.TPUStrategy(_connect_tpu(address, timeout_seconds)),
                        synchronized_batch_norm=synchronized_batch_norm, steps_per_execution=steps_per_execution,
                        name="tpu")


def _split_cpu(count):
    """Splits the first CPU into `count` logical devices (before TensorFlow starts)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        raise UserError(f"trainer.strategy.mirrored.logical_cpus = {count} must take effect before TensorFlow starts, "
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
            f"The TPU strategy was selected (trainer.strategy.tpu, address = {tpu!r}) but no TPU "
            f"could be reached: {reason}. On a Cloud TPU VM or in Colab leave address = ''; elsewhere give "
            "the TPU's name or its grpc:// address, or include gin/strategy/default.gin to run on "
            "this machine.") from None
    return resolver
