"""The data check before training: each split's images, the undecodable ones, and the classes' balance.

Works on any `trainer.data.sources.Source`: every example's bytes go
through the same decoder training uses, and what cannot be decoded is
named by its example id. The result (`model_dir/data_report.json`) is
cached under the source's fingerprint, so a dataset is decoded for the scan
once, not on every run; and when the training split has just been decoded
into memory anyway, the scan takes that pass's result instead of decoding
it again.
"""

import json
import os

import tensorflow as tf

from trainer.data.preprocess import decode_pixels

SCAN_VERSION = 3  # 3: an RGBA WebP decodes (as in training); 2 counted it unreadable.
TINY_CLASS_FRACTION = 0.1  # A class with fewer training images than this fraction of the median is "tiny".
IMBALANCE_RATIO = 2.0  # Most / fewest training images a class above which the split is called imbalanced.


def scan_cache_dir():
    """Where scans are cached: $TRAINER_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /tiny-imagenet-trainer."""
    return os.environ.get("TRAINER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tiny-imagenet-trainer")


def decodable(source, split):
    """(ids, labels) of the examples of `split` that the training decoder can decode, in no particular order."""
    ds = source.examples(split).map(lambda image, label, id_: (id_, label, tf.shape(decode_pixels(image))),
                                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors(log_warning=False)
    ids, labels = [], []
    for id_, label, _ in ds.as_numpy_iterator():
        ids.append(id_.decode("utf-8", "surrogateescape"))
        labels.append(int(label))
    return ids, labels


def _read_cache(path, key):
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    if not (isinstance(report, dict) and report.get("key") == key and isinstance(report.get("splits"), dict)
            and isinstance(report.get("problems"), list) and isinstance(report.get("train_per_class"), dict)):
        return None  # Another version's, or damaged: scanned again.
    return report


def _cache_file(source):
    import hashlib  # pylint: disable=import-outside-toplevel

    # A strict source (a TFRecord 'stop' run) must read for itself what a lenient one skipped past and cached.
    key = f"{SCAN_VERSION}-{source.fingerprint()}{'-strict' if source.strict else ''}"
    return key, os.path.join(scan_cache_dir(), f"scan-{hashlib.sha1(key.encode()).hexdigest()}.json")


def scan(source, use_cache=True, decoded=None):
    """Counts each split's images and the undecodable ones, and the images of each class.

    Args:
      source: a `Source`.
      use_cache: read and write the cache (see `scan_cache_dir`).
      decoded: {split: (ids, labels)} of splits already decoded elsewhere (the in-memory training set): not
        decoded again; or a function returning that dict, called only when the scan is not cached.

    Returns:
      A dict: {'data_dir', 'source', 'splits': {split: {'images', 'unreadable': [ids], 'missing': the images
      the source counts that could not be read}}, 'train_per_class':
      {class id: n}, 'val_per_class', 'empty_classes', 'tiny_classes', 'val_only_classes', 'imbalance'
      (most / fewest, None with an empty class), 'problems' (one line each), 'cached' (the cache file or None)}.
    """
    key, cache = _cache_file(source)
    if use_cache:
        report = _read_cache(cache, key)
        if report is not None:
            report["cached"] = cache
            return report
    decoded = dict((decoded() if callable(decoded) else decoded) or {})
    splits, per_class = {}, {}
    for split in source.splits:
        ids = source.listing(split)[0]
        good_ids, labels = decoded[split] if split in decoded else decodable(source, split)
        good = set(good_ids)
        splits[split] = {"images": len(ids), "unreadable": [i for i in ids if i not in good],
                         "missing": max(0, source.count(split) - len(ids))}  # Counted but not read (a cut shard).
        counts = {c: 0 for c in source.class_ids}
        for label in labels:
            if 0 <= label < source.num_classes:
                counts[source.class_ids[label]] += 1
        per_class[split] = counts
    report = {"key": key, "data_dir": source.location, "source": source.describe(), "splits": splits,
              "train_per_class": per_class.get("train", {}), "val_per_class": per_class.get("val", {})}
    report.update(_problems(report))
    if use_cache:
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(report, f)
            os.replace(tmp, cache)
        except OSError:
            cache = None  # A read-only home: the scan runs again next time.
    report["cached"] = cache if use_cache else None
    return report


def _problems(report):
    """empty_classes, tiny_classes, val_only_classes, imbalance and the problem lines of a report."""
    per_class, val = report["train_per_class"], report["val_per_class"]
    counts = sorted(per_class.values())
    median = counts[len(counts) // 2] if counts else 0
    empty = [c for c, n in per_class.items() if n == 0]
    tiny = [c for c, n in per_class.items() if 0 < n < TINY_CLASS_FRACTION * median]
    val_only = [c for c in empty if val.get(c)]
    imbalance = (max(counts) / min(counts)) if counts and min(counts) > 0 else None
    problems = []
    for split, entry in report["splits"].items():
        bad = entry["unreadable"]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            problems.append(f"{len(bad)} of the {entry['images']} {split} images cannot be decoded and are skipped: "
                            f"{shown}.")
        if entry.get("missing"):
            problems.append(f"{entry['missing']} of the {entry['images'] + entry['missing']} {split} images the "
                            "dataset counts could not be read (a damaged or cut-off file) and are skipped.")
    if val_only:
        problems.append(f"{len(val_only)} classes have validation images but no training image, so every one of "
                        f"them will be misclassified: {', '.join(val_only[:5])}{' ...' if len(val_only) > 5 else ''}.")
    if empty:
        problems.append(f"{len(empty)} classes have no decodable training image, so the network cannot learn them: "
                        f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}.")
    if tiny:
        problems.append(f"{len(tiny)} classes have fewer than {TINY_CLASS_FRACTION:.0%} of the median "
                        f"{median} training images: " + ", ".join(f"{c} ({per_class[c]})" for c in tiny[:5])
                        + (" ..." if len(tiny) > 5 else "") + ".")
    if imbalance and imbalance >= IMBALANCE_RATIO:
        fewest, most = min(per_class, key=per_class.get), max(per_class, key=per_class.get)
        problems.append(f"The training classes are imbalanced: {per_class[fewest]} ({fewest}) to {per_class[most]} "
                        f"({most}) images a class; consider trainer.optim.cross_entropy.class_weights.")
    return {"empty_classes": empty, "tiny_classes": tiny, "val_only_classes": val_only, "imbalance": imbalance,
            "problems": problems}


def scan_summary(report):
    """One line: each split's images and unreadable ones, and the training images a class."""
    parts = [f"{split} {entry['images']} images ({len(entry['unreadable'])} unreadable"
             + (f", {entry['missing']} more counted but not read)" if entry.get("missing") else ")")
             for split, entry in report["splits"].items()]
    counts = list(report["train_per_class"].values())
    if counts and parts:
        parts[0] += f", {min(counts)} to {max(counts)} a class"
    return "; ".join(parts)
