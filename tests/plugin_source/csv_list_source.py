"""A data source of one's own, outside the trainer package (docs/datasets.md, "A layout of your own").

DATA_DIR/train.csv and DATA_DIR/val.csv list `file,class` rows (file relative to DATA_DIR). Selected by
csv_list.gin, whose first line imports this module; `tests/test_source_plugin.py` trains, evaluates and predicts
with it with this directory on PYTHONPATH.
"""

import tensorflow as tf

from trainer.data import sources
from trainer.registry import configurable


class CsvList(sources.FileSource):
    kind = "csv_list"
    splits = ("train", "val")

    def __init__(self, data_dir):
        super().__init__()
        self.location = data_dir
        self.rows = {}
        for split in self.splits:
            path = sources.join(data_dir, f"{split}.csv")
            if not tf.io.gfile.exists(path):
                raise sources.DatasetNotFoundError(f"No {path}: a csv_list dataset lists its images in "
                                                   "DATA_DIR/train.csv and DATA_DIR/val.csv (file,class rows).")
            self.rows[split] = [line.split(",") for line in sources.read_lines(path) if line]
        self.class_ids = sorted({label for rows in self.rows.values() for _, label in rows})
        self.class_names = list(self.class_ids)

    def _list(self, split):
        """(paths, labels) of a split: what FileSource needs to read, count, list and fingerprint it."""
        rows = self.rows[split]
        return [sources.join(self.location, f) for f, _ in rows], [self.class_ids.index(c) for _, c in rows]


@configurable("trainer.sources")
def csv_list(data_dir):
    return CsvList(data_dir)
