"""What the export's per-row `valid` flag costs: the serving function against one that fails the whole call.

    python benchmarks/serving.py
    python benchmarks/serving.py --model=gin/models/small.gin --image_size=64 --batch_sizes=1,32,128

Two serving functions of one network (`trainer.export._Serving`, as the
SavedModel's `serving_default` runs it, traced once each): today's, which
decodes every image in a tf.data pipeline that drops an undecodable image
(`ignore_errors`) and flags its row, and the baseline it replaced, which
decodes with `tf.map_fn` and fails the whole call on one bad image. Both get
the same JPEG bytes, once at the network's size (no resize) and once as
500 x 375 photos (resized). Timed rounds alternate between the two; the first
round of each is warm-up. The table shows the median milliseconds per call and
new / old (1.0: no cost; above 1: slower).
"""

import io
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

from trainer import cli, config  # pylint: disable=wrong-import-position

flags.DEFINE_string("model", "gin/models/small.gin", "Gin model file.")
flags.DEFINE_integer("image_size", 64, "Input side in pixels.")
flags.DEFINE_list("batch_sizes", ["1", "32", "128"], "Images per call.")
flags.DEFINE_integer("rounds", 7, "Timed rounds of each, after one warm-up round.")
FLAGS = flags.FLAGS


def _jpegs(count, size):
    import numpy as np  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _servings():
    """(new, old) serving functions of one network, built from --model."""
    import gin  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from trainer import export  # pylint: disable=import-outside-toplevel
    from trainer.data.preprocess import Preprocessing  # pylint: disable=import-outside-toplevel
    from trainer.models import builder  # pylint: disable=import-outside-toplevel

    gin.clear_config()
    cli.register_configurables()
    config.parse_gin([FLAGS.model], defaults=["NUM_CLASSES = 200"])
    model = builder.build_network(FLAGS.image_size)
    metadata = {"wnids": [str(i) for i in range(200)], "names": [str(i) for i in range(200)], "top_k": 5}
    preprocess = Preprocessing(FLAGS.image_size)

    class Baseline(export._Serving):  # pylint: disable=protected-access
        def _decode(self, images):
            size = self._preprocess.image_size
            pixels = tf.map_fn(self._preprocess.decode, images,
                               fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
            return pixels, tf.ones_like(images, tf.bool)

    return export._Serving(model, metadata, preprocess).serve, Baseline(model, metadata, preprocess).serve  # pylint: disable=protected-access


def _time(function, images, calls):
    start = time.perf_counter()
    for _ in range(calls):
        function(images)["probabilities"].numpy()
    return (time.perf_counter() - start) / calls


def main(argv):
    del argv
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    new, old = _servings()
    print(f"{FLAGS.model} at {FLAGS.image_size} px, median ms per call over {FLAGS.rounds} rounds")
    print(f"{'images':<12}{'batch':>6}{'new ms':>10}{'old ms':>10}{'new/old':>9}")
    for label, size in ((f"{FLAGS.image_size} px", (FLAGS.image_size, FLAGS.image_size)), ("500x375", (500, 375))):
        for batch in (int(b) for b in FLAGS.batch_sizes):
            images = tf.constant(_jpegs(batch, size))
            calls = max(1, 64 // batch)
            times = {"new": [], "old": []}
            for round_ in range(FLAGS.rounds + 1):
                for name, function in (("new", new), ("old", old)):
                    seconds = _time(function, images, calls)
                    if round_:
                        times[name].append(seconds)
            ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
            print(f"{label:<12}{batch:>6}{ms['new']:>10.2f}{ms['old']:>10.2f}{ms['new'] / ms['old']:>9.2f}")


if __name__ == "__main__":
    app.run(main)
