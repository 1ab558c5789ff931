"""A second, independent oracle: SPEC.md's rule table as plain Python loops, one sample at a time.

Slow and literal on purpose. The ``numpy`` backend is the reference the fast backends are
compared with; this file checks that reference (and SPEC's worked example checks both).
"""

import numpy as np


def scatter_sub(centers, labels, updates):
    result = np.array(centers, dtype=np.float64)
    for label, update in zip(labels, updates):
        result[label] -= update  # one row at a time, so duplicates accumulate
    return result


def center_loss(features, labels, centers, alpha, rule):
    features = np.asarray(features, dtype=np.float64)
    before = np.array(centers, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    batch, width = features.shape
    differences = [features[i] - before[labels[i]] for i in range(batch)]
    squares = sum(float(d @ d) for d in differences)
    sums = np.zeros_like(before)
    counts = np.zeros(len(before))
    for label, difference in zip(labels, differences):
        sums[label] += difference
        counts[label] += 1
    after = before.copy()
    grad_centers = None
    if rule == "facenet":
        loss = squares / (batch * width) if batch else 0.0
        grad = [2 * d / (batch * width) for d in differences]
        for j in range(len(before)):
            after[j] = before[j] + (1 - alpha) * sums[j]
    elif rule == "wen":
        loss = squares / (2 * batch) if batch else 0.0
        grad = [d / batch for d in differences]
        for j in range(len(before)):
            after[j] = before[j] + alpha * sums[j] / (1 + counts[j])
    elif rule == "pytorch":
        loss = squares / batch if batch else 0.0
        grad = [2 * d / batch for d in differences]
        grad_centers = np.zeros_like(before)
        for j in range(len(before)):
            if counts[j]:
                grad_centers[j] = -(2 / batch) * sums[j]
    else:
        raise ValueError(rule)
    return loss, np.array(grad).reshape(batch, width), after, grad_centers
