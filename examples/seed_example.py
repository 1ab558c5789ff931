"""The seed example: facenet's center loss on nine samples, beside TensorFlow's own numbers.

facenet's TensorFlow code, run on nine samples of five features in three classes (centers at
zero, alpha 0.5), gives the losses and centers below (tf.compat.v1 graph mode). Three steps of
``center_loss(..., rule="facenet", out=centers)`` on every backend that runs here must give the
same, to within 1e-6; the script exits with status 1 if one does not.

    python examples/seed_example.py

(``python -m centerkern demo`` runs the same example, with facenet's divergence on a repeated
class and a timing table.)
"""

from __future__ import annotations

import sys

import numpy as np

import centerkern

features = np.array([[1, 1, 1, 1, 1], [1, 1, 2, 1, 1], [1, 1, 3, 1, 1], [1, 1, 4, 1, 1],
                     [2, 2, 2, 1, 2], [2, 2, 2, 2, 2], [2, 2, 2, 3, 2], [3, 3, 3, 3, 1],
                     [3, 3, 3, 3, 2]], dtype=np.float32)
labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
TENSORFLOW = [  # (loss, centers after the step)
    (4.1111111, [[2, 2, 5, 2, 2], [3, 3, 3, 3, 3], [3, 3, 3, 3, 1.5]]),
    (1.4111111, [[0, 0, 0, 0, 0], [1.5, 1.5, 1.5, 1.5, 1.5], [3, 3, 3, 3, 1.5]]),
    (1.1611111, [[2, 2, 5, 2, 2], [2.25, 2.25, 2.25, 2.25, 2.25], [3, 3, 3, 3, 1.5]]),
]


def rows(centers) -> str:
    return " ".join("[" + " ".join(f"{value:g}" for value in row) + "]" for row in np.asarray(centers))


def main() -> int:
    backends = centerkern.backends()  # numpy, numba, and cuda where Numba finds a GPU
    centers = {backend: np.zeros((3, 5), dtype=np.float32) for backend in backends}
    agree = True
    for step, (tf_loss, tf_centers) in enumerate(TENSORFLOW):
        print(f"step {step}")
        print(f"  {'TensorFlow':<10}  loss {tf_loss:.7f}  centers {rows(tf_centers)}")
        for backend in backends:
            result = centerkern.center_loss(features, labels, centers[backend], 0.5, rule="facenet",
                                            out=centers[backend], backend=backend)
            same = bool(np.isclose(result.loss, tf_loss, rtol=1e-6)
                        and np.allclose(result.centers, tf_centers, rtol=1e-6))
            agree &= same
            print(f"  {backend:<10}  loss {result.loss:.7f}  centers {rows(result.centers)}  "
                  f"{'same' if same else 'DIFFERENT'}")
    print(f"backends {', '.join(backends)}: " + ("every step gives TensorFlow's numbers" if agree
                                                 else "a step differs from TensorFlow's numbers"))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
