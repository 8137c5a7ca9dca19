"""Compact storage of N:M mask positions: a few bits per kept value.

The format has one definition, :mod:`slope_kernels.packed_format`, at the bottom of the
kernels package (torch-only, no triton), so that the library and the Triton kernels read and
write the same bits. This module re-exports it under the library's name; the functions are
the same objects.
"""

from slope_kernels.packed_format import (
    MAX_M,
    bits_per_offset,
    check_pattern,
    pack_positions,
    packed_width,
    unpack_columns,
    unpack_positions,
)

__all__ = [
    "MAX_M",
    "bits_per_offset",
    "check_pattern",
    "pack_positions",
    "packed_width",
    "unpack_columns",
    "unpack_positions",
]
