"""Center-loss steps as people write them in NumPy: correct ones from SPEC's formulas, and the
planted bugs the oracle must catch (each with the diagnosis it should give)."""

import numpy as np


def facenet(features, labels, centers, alpha):
    differences = features - centers[labels]
    new = centers.copy()
    np.add.at(new, labels, (1 - alpha) * differences)
    return np.mean(differences**2), new, 2 * differences / differences.size


def wen(features, labels, centers, alpha):
    differences = features - centers[labels]
    counts = np.bincount(labels, minlength=len(centers))
    new = centers.copy()
    np.add.at(new, labels, alpha * differences / (1 + counts[labels])[:, None])
    return np.sum(differences**2) / (2 * len(features)), new, differences / len(features)


def pytorch(features, labels, centers, alpha):
    differences = features - centers[labels]
    grad_centers = np.zeros_like(centers)
    np.add.at(grad_centers, labels, -2 * differences / len(features))
    return np.sum(differences**2) / len(features), centers, grad_centers


def fancy_index_scatter(features, labels, centers, alpha):
    differences = features - centers[labels]
    new = centers.copy()
    new[labels] += (1 - alpha) * differences  # keeps one update per repeated label
    return np.mean(differences**2), new


def gather_after_update(features, labels, centers, alpha):
    new = centers.copy()
    np.add.at(new, labels, (1 - alpha) * (features - centers[labels]))
    differences = features - new[labels]  # the loss should use the centers before the update
    return np.mean(differences**2), new


def wen_formula_called_facenet(features, labels, centers, alpha):
    return wen(features, labels, centers, alpha)


def loss_over_batch_only(features, labels, centers, alpha):
    loss, new, _ = facenet(features, labels, centers, alpha)
    return loss * features.shape[1], new  # sum over D, mean over B: 1/B instead of 1/(B*D)


def off_by_one_labels(features, labels, centers, alpha):
    return facenet(features, (labels + 1) % len(centers), centers, alpha)[:2]


def float32_inside(features, labels, centers, alpha):
    loss, new, grad = facenet(features.astype(np.float32), labels, centers.astype(np.float32), alpha)
    return float(loss), new.astype(features.dtype)
