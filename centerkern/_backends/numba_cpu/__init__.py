"""The ``numba`` backend: parallel CPU kernels, race-free with any amount of duplicate labels.

The same three functions as every backend (``gather_centers``, ``scatter_sub_update``,
``center_loss_step``), the codebook functions (``assign_codes``, ``class_sums``, ``ema_step``,
``ema_apply``, ``kmeans_update``), and ``zeros`` for large host allocations. Each concern has a module of
its own, each importing only those above it:

- ``jit``: how kernels are compiled (entry points, one signature per dtype) and cached;
- ``sort``: the batch sorted by label, and the plan of each row's role;
- ``rows``: arithmetic on one row, and the named structures a call travels with;
- ``prefetch``: the prefetches that hide a row's random address;
- ``passes``: the passes' bodies and the loops that run them, parallel or serial;
- ``step``: one call, sort to last pass, as the two entry points ``step_serial`` and
  ``step_parallel``;
- ``memory``: the gather and the parallel zeros;
- ``codebooks``: the codebook kernels (per-code sums, the EMA and k-means updates, the nearest code);
- ``driver``: what Python does around an entry point (scratch, threading layer, copies).
"""

from .driver import (ENTRIES, assign_codes, center_loss_step, class_sums, ema_apply, ema_step, gather_centers,
                     kernel_cache, kmeans_update, last_layout, scatter_sub_update, zeros)

__all__ = ["ENTRIES", "assign_codes", "center_loss_step", "class_sums", "ema_apply", "ema_step", "gather_centers",
           "kernel_cache", "kmeans_update", "last_layout", "scatter_sub_update", "zeros"]
