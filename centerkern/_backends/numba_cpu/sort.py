"""The batch sorted by label, and the plan that gives each row its role in the passes.

Plain loops only: each NumPy function used inside a kernel (``np.zeros``, ``.max()``, a slice
assignment with its shape check) is one more implementation for Numba to compile, and together
they cost seconds of a first call. The scratch comes from the caller.
"""

from __future__ import annotations

from .jit import helper

# Pass A's work item: consecutive rows of the batch. Also what makes a class "local".
ROWS_PER_TILE = 64
# Radix digits of at most 11 bits: a 2048-bucket histogram stays in L1.
MAX_DIGIT_BITS = 11
# Labels are int64 values in [0, K): at most 63 bits, so at most this many digits.
MAX_DIGITS = (63 + MAX_DIGIT_BITS - 1) // MAX_DIGIT_BITS
HISTOGRAM_SIZE = MAX_DIGITS << MAX_DIGIT_BITS

# A row's role in pass A (``row_action``): a negative code, or ``slot << SLOT_SHIFT | kind``.
SINGLETON = -1  # its class has this row only: the center row is written by pass A
DEFERRED = -2  # the only row of a spanning class in its tile: pass B reads it again
SLOT_SHIFT = 3
LOCAL_FIRST, LOCAL_ADD, LOCAL_LAST, SPANNING_FIRST, SPANNING_ADD = range(5)


@helper(inline="always")
def _radix_pass(source_labels, source_positions, from_batch, labels, destination_labels, destination_positions,
                offsets, shift, mask):
    """One stable counting pass on the digit ``(label >> shift) & mask``. ``offsets`` holds the
    digit's histogram and is turned into each bucket's next place here. ``from_batch``: the
    source is the batch itself (``labels``, positions 0..B-1)."""
    total = 0
    for bucket in range(offsets.size):
        count = offsets[bucket]
        offsets[bucket] = total
        total += count
    for i in range(labels.size):
        if from_batch:
            label, position = labels[i], i
        else:
            label, position = source_labels[i], source_positions[i]
        bucket = (label >> shift) & mask
        destination_labels[offsets[bucket]] = label
        destination_positions[offsets[bucket]] = position
        offsets[bucket] += 1


@helper(inline="always")
def _digit_varies(counts, batch_size):
    """Whether the labels differ in this digit (else sorting on it leaves the order as it is)."""
    for count in counts:
        if count == batch_size:
            return False
    return True


@helper
def sort_by_label(labels, num_classes, sorted_labels, positions, spare_labels, spare_positions, histogram):
    """Sort the batch positions by label, stably (within a class, in batch order), into
    ``positions`` and ``sorted_labels``. Returns the position of the first label outside
    [0, num_classes) and sorts nothing, or -1. ``histogram``: ``HISTOGRAM_SIZE`` of scratch."""
    batch_size = labels.size
    bits = 1
    while (1 << bits) < num_classes:
        bits += 1
    digits = (bits + MAX_DIGIT_BITS - 1) // MAX_DIGIT_BITS
    digit_bits = (bits + digits - 1) // digits
    buckets = 1 << digit_bits
    mask = buckets - 1
    for i in range(digits * buckets):
        histogram[i] = 0
    for i in range(batch_size):  # every digit's histogram, and the range check, in one pass
        label = labels[i]
        if label < 0 or label >= num_classes:
            return i
        for digit in range(digits):
            histogram[digit * buckets + ((label >> (digit * digit_bits)) & mask)] += 1

    # A digit on which every label agrees leaves the order as it is: its histogram is marked
    # (its first count set to -1) and its pass skipped.
    remaining = 0
    for digit in range(digits):
        if _digit_varies(histogram[digit * buckets:(digit + 1) * buckets], batch_size):
            remaining += 1
        else:
            histogram[digit * buckets] = -1
    if remaining == 0:
        for i in range(batch_size):
            sorted_labels[i] = labels[i]
            positions[i] = i
        return -1
    from_batch = True
    for digit in range(digits):
        if histogram[digit * buckets] < 0:
            continue
        # ping-pong between the two pairs so that the last pass lands in the result's pair
        last_into_result = remaining % 2 == 1
        _radix_pass(spare_labels if last_into_result else sorted_labels,
                    spare_positions if last_into_result else positions, from_batch, labels,
                    sorted_labels if last_into_result else spare_labels,
                    positions if last_into_result else spare_positions,
                    histogram[digit * buckets:(digit + 1) * buckets], digit * digit_bits, mask)
        from_batch = False
        remaining -= 1
    return -1


@helper
def plan(sorted_labels, positions, row_action, class_size, item_codes, item_labels, local_slots_in_tile):
    """Each row's role in pass A (``row_action``; at a local class's last row, ``class_size``
    too), and pass B's items in label order: a spanning class's single row in a tile (code: its
    position) or its slot (code: ``-1 - slot``). Returns (pass B's item count, spanning slots, rows
    among pass B's items, the most local slots one tile needs)."""
    batch_size = sorted_labels.size
    for tile in range(local_slots_in_tile.size):
        local_slots_in_tile[tile] = 0
    items = 0
    spanning_slots = 0
    rows_read_again = 0
    most_local = 0
    start = 0
    while start < batch_size:
        label = sorted_labels[start]
        end = start + 1
        while end < batch_size and sorted_labels[end] == label:
            end += 1
        if end - start == 1:
            row_action[positions[start]] = SINGLETON
        elif positions[start] // ROWS_PER_TILE == positions[end - 1] // ROWS_PER_TILE:
            tile = positions[start] // ROWS_PER_TILE
            slot = local_slots_in_tile[tile] << SLOT_SHIFT
            local_slots_in_tile[tile] += 1
            most_local = max(most_local, local_slots_in_tile[tile])
            for t in range(start, end):
                row_action[positions[t]] = slot | LOCAL_ADD
            row_action[positions[start]] = slot | LOCAL_FIRST
            row_action[positions[end - 1]] = slot | LOCAL_LAST
            class_size[positions[end - 1]] = end - start  # read at that row only
        else:
            run_start = start
            while run_start < end:  # the class's rows tile by tile
                tile = positions[run_start] // ROWS_PER_TILE
                run_end = run_start + 1
                while run_end < end and positions[run_end] // ROWS_PER_TILE == tile:
                    run_end += 1
                if run_end == run_start + 1:
                    row_action[positions[run_start]] = DEFERRED
                    item_codes[items] = positions[run_start]
                    rows_read_again += 1
                else:
                    slot = spanning_slots << SLOT_SHIFT
                    for t in range(run_start, run_end):
                        row_action[positions[t]] = slot | SPANNING_ADD
                    row_action[positions[run_start]] = slot | SPANNING_FIRST
                    item_codes[items] = -1 - spanning_slots
                    spanning_slots += 1
                item_labels[items] = label
                items += 1
                run_start = run_end
        start = end
    return items, spanning_slots, rows_read_again, most_local
