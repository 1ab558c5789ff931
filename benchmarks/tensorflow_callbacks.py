"""Whether the TensorFlow adapter could skip ``tf.numpy_function``: the same host step (rule
``wen``, B=1024, D=512, K=10^4, float32, the batch's classes only) inside a ``tf.function`` through
``tf.numpy_function`` and through ``tf.py_function`` with the tensors shared by DLPack, and the
fixed cost of an empty call of each; medians of 60 calls, two rounds, one process.

    python benchmarks/tensorflow_callbacks.py
"""
import os
import statistics
import time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
import centerkern
from centerkern._adapters.batch_classes import host_step

rng = np.random.default_rng(0)
B, D, K = 1024, 512, 10000
f = rng.standard_normal((B, D)).astype(np.float32); y = rng.integers(0, K, B)
classes, index = np.unique(y, return_inverse=True)
rows = rng.standard_normal((len(classes), D)).astype(np.float32)
args = [tf.constant(f), tf.constant(y), tf.constant(index.astype(np.int64)), tf.constant(rows), tf.constant(np.float32(0.5))]
call = lambda *a: host_step(*a, num_classes=K, rule="wen", backend="numba")

@tf.function
def via_numpy_function(*a):
    return tf.numpy_function(call, list(a), [tf.float32, tf.float32, tf.float32], stateful=False)

def dlpack_call(*a):
    arrays = [np.from_dlpack(x) for x in a]  # eager tensors in py_function: shared through DLPack
    loss, grad, new_rows = call(*arrays)
    return [tf.experimental.dlpack.from_dlpack(np.asarray(v).__dlpack__()) if np.asarray(v).ndim else tf.constant(v)
            for v in (loss, grad, new_rows)]

@tf.function
def via_py_function_dlpack(*a):
    return tf.py_function(dlpack_call, list(a), [tf.float32, tf.float32, tf.float32])

@tf.function
def empty_numpy_function(x):
    return tf.numpy_function(lambda x: x, [x], [tf.float32], stateful=False)

@tf.function
def empty_py_function(x):
    return tf.py_function(lambda x: x, [x], [tf.float32])

def median_ms(fn, *a, n=60):
    fn(*a); times = []
    for _ in range(n):
        t = time.perf_counter(); out = fn(*a); _ = [o.numpy() for o in (out if isinstance(out, (list, tuple)) else [out])]; times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)

x = tf.constant(np.float32(1.0))
for round_ in range(2):
    print({"numpy_function step": median_ms(via_numpy_function, *args), "py_function + DLPack step": median_ms(via_py_function_dlpack, *args),
           "empty numpy_function": median_ms(empty_numpy_function, x), "empty py_function": median_ms(empty_py_function, x)})
