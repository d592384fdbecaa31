"""Classification metrics in numpy, from per-image scores and labels.

Every function takes plain arrays (no TensorFlow), so tests can recompute
them independently and the evaluator stays a thin layer over them.
"""

import numpy as np

ECE_BINS = 15


def softmax(logits):
    """Row-wise softmax in float64.

    Args:
      logits: [N, K] scores.

    Returns:
      [N, K] float64 probabilities.
    """
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(logits, labels):
    """Per-image cross-entropy of integer labels given logits, in float64.

    Args:
      logits: [N, K] scores.
      labels: [N] class indices.

    Returns:
      [N] float64 losses.
    """
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


def in_top_k(scores, labels, k):
    """Whether each label is among the k highest scores, as `tf.math.in_top_k` decides it.

    A label counts as in the top k when fewer than k classes score strictly
    higher (so ties at the boundary count in, like TensorFlow's op).

    Args:
      scores: [N, K] logits or probabilities.
      labels: [N] class indices.
      k: how many top classes count.

    Returns:
      [N] bool.
    """
    scores = np.asarray(scores)
    target = scores[np.arange(len(labels)), labels][:, None]
    return (scores > target).sum(axis=1) < k


def confusion_matrix(labels, predictions, num_classes):
    """Counts of (true, predicted) pairs.

    Args:
      labels: [N] true class indices.
      predictions: [N] predicted class indices.
      num_classes: K.

    Returns:
      int64 [K, K]; row = true class, column = predicted class.
    """
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def per_class(confusion):
    """Support, accuracy (= recall), precision of each class from a confusion matrix.

    Args:
      confusion: [K, K] counts (row = true class).

    Returns:
      A dict of [K] float64 arrays: 'support', 'predicted', 'accuracy', 'recall',
      'precision'; a ratio with a zero denominator is NaN.
    """
    confusion = np.asarray(confusion, np.float64)
    hits = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)
        precision = np.where(predicted > 0, hits / predicted, np.nan)
    return {"support": support, "predicted": predicted, "accuracy": recall, "recall": recall,
            "precision": precision}


def most_confused(confusion, n=20):
    """The n largest off-diagonal cells of a confusion matrix, largest first (ties: row-major order).

    Args:
      confusion: [K, K] counts.
      n: how many pairs.

    Returns:
      A list of (true, predicted, count) with count > 0.
    """
    off = np.array(confusion, np.int64)
    np.fill_diagonal(off, 0)
    flat = off.ravel()
    order = np.argsort(-flat, kind="stable")[:n]
    k = off.shape[0]
    return [(int(i // k), int(i % k), int(flat[i])) for i in order if flat[i] > 0]


def reliability(confidences, correct, bins=ECE_BINS):
    """Reliability bins and the expected calibration error (Guo et al., 2017).

    Confidences fall into `bins` equal-width bins (lower, upper] over [0, 1];
    ECE = sum over bins of (bin count / N) * |accuracy of bin - mean confidence of bin|.

    Args:
      confidences: [N] probability of the predicted class.
      correct: [N] bool, whether the prediction was right.
      bins: number of bins.

    Returns:
      (ece, rows): ece a float; rows a list of dicts per bin with 'lower',
      'upper', 'count', 'accuracy', 'confidence' (None when the bin is empty).
    """
    confidences = np.asarray(confidences, np.float64)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds (edges[b], edges[b + 1]]; a confidence of exactly 0 goes to the first bin.
    index = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, bins - 1)
    ece, rows = 0.0, []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        row = {"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
               "accuracy": None, "confidence": None}
        if count:
            row["accuracy"] = float(correct[mask].mean())
            row["confidence"] = float(confidences[mask].mean())
            ece += count / len(confidences) * abs(row["accuracy"] - row["confidence"])
        rows.append(row)
    return float(ece), rows


def cluster_order(confusion):
    """An order of the classes that puts classes confused with each other next to each other.

    Greedy agglomeration: the classes start as one-class chains; the two
    chains with the highest average similarity (symmetrised confusion rate)
    join end to end, in the orientation whose touching ends are the most
    similar, until one chain is left. A group of classes confused only among
    themselves ends up contiguous.

    Args:
      confusion: [K, K] counts (row = true class).

    Returns:
      A list of the K class indices.
    """
    confusion = np.asarray(confusion, np.float64)
    k = confusion.shape[0]
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1.0)
    similarity = rates + rates.T
    np.fill_diagonal(similarity, 0.0)
    linkage = similarity.copy()  # Summed similarity between chains (indexed by their first member).
    size = np.ones(k)
    chains = {i: [i] for i in range(k)}
    active = np.ones(k, bool)
    while len(chains) > 1:
        average = linkage / np.outer(size, size)
        average[~active, :] = -np.inf
        average[:, ~active] = -np.inf
        np.fill_diagonal(average, -np.inf)
        a, b = np.unravel_index(np.argmax(average), average.shape)
        a, b = min(a, b), max(a, b)
        first, second = chains[a], chains.pop(b)
        joins = [first + second, first + second[::-1], second + first, second[::-1] + first]
        touching = [similarity[first[-1], second[0]], similarity[first[-1], second[-1]],
                    similarity[second[-1], first[0]], similarity[second[0], first[0]]]
        chains[a] = joins[int(np.argmax(touching))]
        linkage[a, :] += linkage[b, :]
        linkage[:, a] += linkage[:, b]
        size[a] += size[b]
        active[b] = False
    return next(iter(chains.values()))
