"""The tf.distribute strategy, selected in gin (gin/strategy/*.gin).

    make_strategy.kind = 'default'        # one device (CPU or one GPU)
    make_strategy.kind = 'mirrored'       # GPUs (or devices) of one machine
    make_strategy.kind = 'multi_worker'   # MultiWorkerMirroredStrategy, cluster from TF_CONFIG
    make_strategy.kind = 'tpu'            # TPUStrategy; make_strategy.tpu = 'name' or 'grpc://...'

Every strategy runs the same training loop (`trainer.train`).
"""

import gin
import tensorflow as tf

from trainer.errors import UserError

KINDS = ("default", "mirrored", "multi_worker", "tpu")


@gin.configurable
def make_strategy(kind="default", devices=None, cross_device_ops=None, tpu="", logical_cpus=0):
    """Creates the distribution strategy.

    Args:
      kind: one of KINDS.
      devices: MirroredStrategy devices, e.g. ['/gpu:0', '/gpu:1']; None = all GPUs
        (or the CPU when there is none).
      cross_device_ops: MirroredStrategy all-reduce: None (TF's choice),
        'reduction_to_one_device' (needed for synchronized BatchNorm over CPU
        logical devices, DESIGN §3), 'nccl' or 'hierarchical_copy'.
      tpu: TPU name or grpc:// address for TPUClusterResolver ('' = local / Colab).
      logical_cpus: if > 1, split the CPU into this many logical devices first
        (to test multi-replica code on a CPU-only machine).

    Returns:
      A `tf.distribute.Strategy`.

    Raises:
      UserError: an unknown kind, or no TPU where the TPU strategy was asked for.
    """
    if logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        ops = {
            None: None,
            "reduction_to_one_device": tf.distribute.ReductionToOneDevice(),
            "nccl": tf.distribute.NcclAllReduce(),
            "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce(),
        }
        if cross_device_ops not in ops:
            raise UserError(f"make_strategy.cross_device_ops must be one of {list(ops)}, got {cross_device_ops!r}.")
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=ops[cross_device_ops])
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError, RuntimeError) as err:
            raise UserError(
                f"The TPU strategy was selected (make_strategy.kind = 'tpu', tpu = {tpu!r}) but no TPU "
                f"could be reached: {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
                "On a Cloud TPU VM leave tpu = '' ('local'); elsewhere give the TPU name or its "
                "grpc:// address, or include gin/strategy/default.gin to run on this machine.") from None
        return tf.distribute.TPUStrategy(resolver)
    raise UserError(f"make_strategy.kind must be one of {', '.join(KINDS)}; got {kind!r}.")
