"""The ``@cuda.jit`` kernels of the codebook functions (``centerkern.codebooks``), compiled when
first launched; ``codebooks`` launches them.

Why this layout:

* The nearest code (``nearest_codes``): one thread per row, looping over the codes, so that no
  N x K matrix ever exists. A block of ``ASSIGN_ROWS`` rows walks the codebook a tile of
  ``TILE_CODES`` codes by ``TILE_DIMS`` columns at a time, staged in shared memory with the
  block's own rows: every code is read from global memory once per block rather than once per
  row, each thread reads a code's element as a broadcast, and the loads of both tiles are
  coalesced along a row. A thread keeps its row's partial distances to the tile's codes in
  float64 and takes a code only when strictly nearer, so ties go to the lowest index, as
  ``argmin``. The distance it returns is the exact sum of squares, not ``|e|^2 - 2 x.e``.
* The per-code sums (``scatter_sums``): in the default mode every (row, column) adds its
  weighted value into its code's float64 row with one ``atomic.add``. Atomics make duplicate
  codes correct however many rows share a code, and a codebook's batch spreads over many codes;
  the order of the additions, and so the last bits, may change from run to run. With
  ``deterministic=True`` the host orders the rows by code (a stable ``argsort`` of a copy of
  the codes, and each code's offsets into that order), and ``ordered_sums`` gives each (code,
  column) one thread that adds the code's rows in batch order: no float atomics, the same bits
  whatever the launch shape, and without weights the bits of the reference's ``np.add.at``
  (with weights the compiler may fuse ``w * x + sum`` into one rounding).
* The EMA update: ``ema_sizes`` computes the new cluster sizes and their total in one block,
  each thread over a fixed stride of codes and then a tree in shared memory, so that the total
  (which every Laplace-smoothed code divides by) is summed in the same order on every run;
  ``ema_codes`` then updates each (code, column) on its own. Everything is computed in float64
  from the float64 sums, and rounded to the state's dtype only when written.
* The k-means update: ``kmeans_centers`` moves each (code, column), then ``kmeans_weights``
  adds the batch's weights to ``weight_sums``, a launch later, so that no thread writes a
  weight another thread of the same kernel still reads.

Each update kernel reads an element of the state and writes it back from the same thread; a
state element is never read after another thread wrote it, so the state is as if read whole
before any of it is written (the validation refuses state arrays that overlap an input or each
other).

Codes and weights are checked in one kernel (``check_codes``), which also writes the codes as
int64 and the weights as float64 and counts each code's rows (integer atomics: exact in any
order); the host reads its verdict before anything of the caller is written.

The simulator's tests shrink the launch shapes and tiles through ``CENTERKERN_CUDA_TILE`` (as
for ``kernels``), so that small inputs span several tiles and blocks; kernels built so are never
written to the disk cache.
"""

from __future__ import annotations

import math
import os

from numba import cuda, float64, int64

_SHRUNK = bool(os.environ.get("CENTERKERN_CUDA_TILE"))
_CACHE = not _SHRUNK

# The launch shapes (``codebooks`` launches with them; the shared arrays are sized by them).
if _SHRUNK:
    ASSIGN_ROWS, TILE_CODES, TILE_DIMS = 4, 3, 2
    THREADS, COLUMNS, ROWS_PER_BLOCK, REDUCE_THREADS, MOST_BLOCKS = 8, 4, 2, 4, 2
else:
    # 128 rows (threads) x 16 columns of rows and 32 x 16 of codes: 21 KiB of shared memory a block
    ASSIGN_ROWS, TILE_CODES, TILE_DIMS = 128, 32, 16
    THREADS, COLUMNS, ROWS_PER_BLOCK, REDUCE_THREADS, MOST_BLOCKS = 256, 32, 8, 256, 4096

_ROWS_TILE = (ASSIGN_ROWS, TILE_DIMS + 1)  # + 1: a row's stride falls in another bank, no conflicts
_CODES_TILE = (TILE_CODES, TILE_DIMS)


# --------------------------------------------------------------------------- kernels


@cuda.jit(cache=_CACHE)
def nearest_codes(features, codebook, codes, distances):
    """Each row's nearest code (the first of equal ones) and its squared distance; one thread a row."""
    rows_tile = cuda.shared.array(_ROWS_TILE, float64)
    codes_tile = cuda.shared.array(_CODES_TILE, float64)
    partial = cuda.local.array(TILE_CODES, float64)
    thread = cuda.threadIdx.x
    first_row = cuda.blockIdx.x * ASSIGN_ROWS
    num_rows, width = features.shape
    num_codes = codebook.shape[0]
    best, best_distance = int64(0), math.inf
    for code_start in range(0, num_codes, TILE_CODES):
        for c in range(TILE_CODES):
            partial[c] = 0.0
        for column_start in range(0, width, TILE_DIMS):
            for i in range(thread, ASSIGN_ROWS * TILE_DIMS, ASSIGN_ROWS):
                r, d = i // TILE_DIMS, i % TILE_DIMS
                row, column = first_row + r, column_start + d
                rows_tile[r, d] = float64(features[row, column]) if row < num_rows and column < width else 0.0
            for i in range(thread, TILE_CODES * TILE_DIMS, ASSIGN_ROWS):
                c, d = i // TILE_DIMS, i % TILE_DIMS
                code, column = code_start + c, column_start + d
                codes_tile[c, d] = float64(codebook[code, column]) if code < num_codes and column < width else 0.0
            cuda.syncthreads()
            for d in range(TILE_DIMS):  # padding is zero on both sides: it adds nothing
                x = rows_tile[thread, d]
                for c in range(TILE_CODES):
                    difference = x - codes_tile[c, d]
                    partial[c] += difference * difference
            cuda.syncthreads()
        for c in range(min(TILE_CODES, num_codes - code_start)):
            distance = partial[c]
            # strictly nearer, or the first NaN (argmin's choice) unless a NaN is taken already
            if distance < best_distance or (distance != distance and best_distance == best_distance):
                best, best_distance = code_start + c, distance
    row = first_row + thread
    if row < num_rows:
        codes[row] = best
        distances[row] = best_distance


@cuda.jit(cache=_CACHE)
def check_codes(codes, num_codes, weights, checked_codes, checked_weights, counts, status):
    """The codes as int64 and the weights as float64, each code's number of rows (when ``counts``
    has its K entries), and in ``status`` the first position of a code outside [0, K) and of a
    weight that is negative or not finite (the batch size where none)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, codes.size, stride):
        code = int64(codes[i])  # an unsigned code past 2**63 reads negative: refused as well
        if code < 0 or code >= num_codes:
            cuda.atomic.min(status, 0, i)
        else:
            checked_codes[i] = code
            if counts.size > 0:
                cuda.atomic.add(counts, code, 1)
        if weights.size > 0:
            weight = float64(weights[i])
            if not (weight >= 0.0 and weight < math.inf):
                cuda.atomic.min(status, 1, i)
            checked_weights[i] = weight


@cuda.jit(device=True, inline=True)
def _weight(weights, row):
    return weights[row] if weights.size > 0 else 1.0


@cuda.jit(cache=_CACHE)
def scatter_sums(features, codes, weights, counts, sums):
    """Add each row's weight and weighted values into its code's count and sums (zeroed first)
    with float64 atomics: a row per y-thread, its columns over the x-threads."""
    width = features.shape[1]
    first, stride = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, cuda.gridDim.y * cuda.blockDim.y
    for row in range(first, codes.size, stride):
        code = codes[row]
        weight = _weight(weights, row)
        if cuda.threadIdx.x == 0:
            cuda.atomic.add(counts, code, weight)
        for d in range(cuda.threadIdx.x, width, cuda.blockDim.x):
            cuda.atomic.add(sums, (code, d), weight * float64(features[row, d]))


@cuda.jit(cache=_CACHE)
def ordered_sums(features, order, starts, weights, counts, sums):
    """Each code's count and sums, its rows ``order[starts[k]:starts[k + 1]]`` added in that order
    by one thread per (code, column): a code per y-thread, its columns over the x-threads."""
    width = features.shape[1]
    first, stride = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, cuda.gridDim.y * cuda.blockDim.y
    for k in range(first, counts.size, stride):
        begin, end = starts[k], starts[k + 1]
        if cuda.threadIdx.x == 0:
            count = 0.0
            for j in range(begin, end):
                count += _weight(weights, order[j])
            counts[k] = count
        for d in range(cuda.threadIdx.x, width, cuda.blockDim.x):
            total = 0.0
            for j in range(begin, end):
                row = order[j]
                total += _weight(weights, row) * float64(features[row, d])
            sums[k, d] = total


@cuda.jit(cache=_CACHE)
def ema_sizes(cluster_size, counts, decay, new_sizes, total):
    """One block: each code's new cluster size (float64 in ``new_sizes``, and written to
    ``cluster_size``), and their sum in ``total[0]``, added in a fixed order."""
    partials = cuda.shared.array(REDUCE_THREADS, float64)
    thread = cuda.threadIdx.x
    partial = 0.0
    for k in range(thread, cluster_size.size, REDUCE_THREADS):
        size = decay * float64(cluster_size[k]) + (1.0 - decay) * float64(counts[k])
        new_sizes[k] = size
        cluster_size[k] = size
        partial += size
    partials[thread] = partial
    cuda.syncthreads()
    step = REDUCE_THREADS // 2
    while step > 0:
        if thread < step:
            partials[thread] += partials[thread + step]
        cuda.syncthreads()
        step //= 2
    if thread == 0:
        total[0] = partials[0]


@cuda.jit(cache=_CACHE)
def ema_codes(sums, new_sizes, total, embed_avg, embed, decay, eps, laplace):
    """Each (code, column)'s EMA average and smoothed code, from the batch's sums and the new sizes."""
    num_codes, width = embed.shape
    size_total = total[0]
    first, stride = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, cuda.gridDim.y * cuda.blockDim.y
    for k in range(first, num_codes, stride):
        if laplace:
            divisor = (new_sizes[k] + eps) / (size_total + num_codes * eps) * size_total
        else:
            divisor = new_sizes[k] + eps
        for d in range(cuda.threadIdx.x, width, cuda.blockDim.x):
            average = decay * float64(embed_avg[k, d]) + (1.0 - decay) * float64(sums[k, d])
            embed_avg[k, d] = average
            if laplace:
                embed[k, d] = average / divisor
            else:
                embed[k, d] = (average + eps * float64(embed[k, d])) / divisor


@cuda.jit(cache=_CACHE)
def kmeans_centers(counts, sums, centers, weight_sums):
    """Each center the batch holds moves to the weighted mean of itself and its rows."""
    num_codes, width = centers.shape
    first, stride = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, cuda.gridDim.y * cuda.blockDim.y
    for k in range(first, num_codes, stride):
        count = float64(counts[k])
        if count > 0.0:  # scikit-learn leaves a center its batch does not hold as it is
            old_weight = float64(weight_sums[k])
            new_weight = old_weight + count
            for d in range(cuda.threadIdx.x, width, cuda.blockDim.x):
                centers[k, d] = (float64(centers[k, d]) * old_weight + float64(sums[k, d])) / new_weight


@cuda.jit(cache=_CACHE)
def kmeans_weights(counts, weight_sums):
    """``weight_sums`` grows by the batch's weights (after ``kmeans_centers`` read it)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for k in range(start, weight_sums.size, stride):
        count = float64(counts[k])
        if count > 0.0:
            weight_sums[k] = float64(weight_sums[k]) + count


@cuda.jit(cache=_CACHE)
def gather_rows(codebook, codes, rows):
    """``rows[i] = codebook[codes[i]]``: the quantized rows."""
    first, stride = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y, cuda.gridDim.y * cuda.blockDim.y
    for i in range(first, codes.size, stride):
        code = codes[i]
        for d in range(cuda.threadIdx.x, rows.shape[1], cuda.blockDim.x):
            rows[i, d] = codebook[code, d]


#: Every kernel of this module, for the compilation checks.
KERNELS = (nearest_codes, check_codes, scatter_sums, ordered_sums, ema_sizes, ema_codes, kmeans_centers,
           kmeans_weights, gather_rows)
