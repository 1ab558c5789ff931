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


# the two cases that once drew a misleading diagnosis


def wen_centers_with_facenets_loss_in_float32(features, labels, centers, alpha):
    """Claims facenet: the loss is facenet's (right), the centers wen's update, in float32."""
    loss, _, _ = facenet(features, labels, centers, alpha)
    _, new, _ = wen(features, labels, centers, alpha)
    return loss, new.astype(np.float32)


def pytorch_third_output_is_the_features_gradient(features, labels, centers, alpha):
    loss, new, _ = pytorch(features, labels, centers, alpha)
    return loss, new, 2 * (features - centers[labels]) / len(features)  # d loss / d features, (B, D)


# formula mistakes


def facenet_alpha_as_step(features, labels, centers, alpha):
    differences = features - centers[labels]
    new = centers.copy()
    np.add.at(new, labels, alpha * differences)  # facenet's alpha is the retention: the step is 1 - alpha
    return np.mean(differences**2), new


def facenet_sign_flipped(features, labels, centers, alpha):
    differences = features - centers[labels]
    new = centers.copy()
    np.add.at(new, labels, -(1 - alpha) * differences)  # pushed away from the features
    return np.mean(differences**2), new


def wen_count_without_one(features, labels, centers, alpha):
    differences = features - centers[labels]
    counts = np.bincount(labels, minlength=len(centers))
    new = centers.copy()
    np.add.at(new, labels, alpha * differences / counts[labels][:, None])  # n_j, not 1 + n_j
    return np.sum(differences**2) / (2 * len(features)), new


def facenet_averaged_per_class(features, labels, centers, alpha):
    differences = features - centers[labels]
    counts = np.bincount(labels, minlength=len(centers))
    new = centers.copy()
    np.add.at(new, labels, (1 - alpha) * differences / counts[labels][:, None])  # facenet sums, not averages
    return np.mean(differences**2), new


# form mistakes


def loss_not_a_scalar(features, labels, centers, alpha):
    differences = features - centers[labels]
    _, new, _ = facenet(features, labels, centers, alpha)
    return np.mean(differences**2, axis=1), new  # one loss per sample


def centers_transposed(features, labels, centers, alpha):
    loss, new, _ = facenet(features, labels, centers, alpha)
    return loss, new.T


def centers_in_float32(features, labels, centers, alpha):
    loss, new, _ = facenet(features, labels, centers, alpha)
    return loss, new.astype(np.float32)


def pytorch_moves_the_centers(features, labels, centers, alpha):
    loss, _, grad_centers = pytorch(features, labels, centers, alpha)
    return loss, centers - 0.5 * grad_centers, grad_centers  # an optimizer step taken inside the loss


# correct, as the paper's own Caffe layer computes it: loops over samples and classes


def caffe_face_loop(features, labels, centers, alpha):
    batch, width = features.shape
    loss = 0.0
    distance = np.empty_like(features)
    for i in range(batch):
        distance[i] = features[i] - centers[labels[i]]
        loss += float(np.dot(distance[i], distance[i]))
    new = centers.copy()
    for j in range(len(centers)):
        count, variation = 0, np.zeros(width, dtype=features.dtype)
        for i in range(batch):
            if labels[i] == j:
                count += 1
                variation -= distance[i]  # center_diff accumulates c_j - x_i
        new[j] -= alpha * variation / (count + 1.0)  # the solver's step with learning rate alpha
    return loss / batch / 2.0, new, distance / batch


# two mistakes at once: each quantity has its own


def loss_over_batch_and_duplicates_dropped(features, labels, centers, alpha):
    """The loss scaled by 1/B (a sum over D), and a fancy-index update that drops duplicates."""
    loss, _ = loss_over_batch_only(features, labels, centers, alpha)
    _, new = fancy_index_scatter(features, labels, centers, alpha)
    return loss, new


# mistakes a new user's steps made (each written as a person would, not from a prediction)


def wen_gathered_late_with_float32_sums(features, labels, centers, alpha):
    """Claims wen: moves the centers first, then gathers them for the loss; and sums each class
    in a float32 buffer whatever the inputs' dtype."""
    counts = np.bincount(labels, minlength=len(centers))
    sums = np.zeros(centers.shape, dtype=np.float32)
    np.add.at(sums, labels, features - centers[labels])
    new = centers + alpha * sums / (1 + counts)[:, None]
    differences = features - new[labels]  # the loss should use the centers before the update
    return np.sum(differences**2) / (2 * len(features)), new


def wen_float32_sums(features, labels, centers, alpha):
    counts = np.bincount(labels, minlength=len(centers))
    sums = np.zeros(centers.shape, dtype=np.float32)  # float32 whatever the inputs
    np.add.at(sums, labels, features - centers[labels])
    differences = features - centers[labels]
    return np.sum(differences**2) / (2 * len(features)), centers + alpha * sums / (1 + counts)[:, None]


def wen_alpha_crossed(features, labels, centers, alpha):
    differences = features - centers[labels]
    counts = np.bincount(labels, minlength=len(centers))
    new = centers.copy()
    step = 1 - alpha  # alpha read as facenet's retention; wen's alpha is the step itself
    np.add.at(new, labels, step * differences / (1 + counts[labels])[:, None])
    return np.sum(differences**2) / (2 * len(features)), new


def pytorch_grad_centers_over_count(features, labels, centers, alpha):
    differences = features - centers[labels]
    counts = np.bincount(labels, minlength=len(centers))
    grad_centers = np.zeros_like(centers)
    np.add.at(grad_centers, labels, -2 * differences / len(features))
    grad_centers /= (1 + counts)[:, None]  # wen's count brought into the trainable rule
    return np.sum(differences**2) / len(features), centers, grad_centers


def facenet_labels_clamped(features, labels, centers, alpha):
    labels = np.minimum(labels, len(centers) - 2) if len(centers) > 1 else labels  # the last class folded in
    differences = features - centers[labels]
    new = centers.copy()
    np.add.at(new, labels, (1 - alpha) * differences)
    return np.mean(differences**2), new


def wen_without_its_count(features, labels, centers, alpha):
    differences = features - centers[labels]
    new = centers.copy()
    np.add.at(new, labels, alpha * differences)  # alpha right, but no division by 1 + n_j
    return np.sum(differences**2) / (2 * len(features)), new


def facenet_with_wens_count(features, labels, centers, alpha):
    differences = features - centers[labels]
    counts = np.bincount(labels, minlength=len(centers))
    new = centers.copy()
    np.add.at(new, labels, (1 - alpha) * differences / (1 + counts[labels])[:, None])  # 1 - alpha right
    return np.mean(differences**2), new


def wen_loss_summed_in_float32(features, labels, centers, alpha):
    _, new, _ = wen(features, labels, centers, alpha)
    differences = (features - centers[labels]).astype(np.float32)  # a float32 sum of squares
    return float(np.sum(differences * differences)) / (2 * len(features)), new
