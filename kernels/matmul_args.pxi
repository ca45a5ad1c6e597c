# The argument checks of matmul_into that _kquants.pyx and _amx.pyx share (included by both).
# The messages are formatted only when a check fails: decode makes ~145 such calls a step.

cdef inline int _check_matmul_args(str who, str name, Py_ssize_t n, Py_ssize_t cols, Py_ssize_t rows,
                                   Py_ssize_t row_bytes, Py_ssize_t block_bytes, Py_ssize_t out_n,
                                   Py_ssize_t out_rows) except -1:
    """x: float32[n, cols] of 256-element blocks, w: uint8[rows, row_bytes] of `name` blocks of
    block_bytes, out: float32[out_n, out_rows] = [n, rows]."""
    if cols % 256:
        raise ValueError(f"{who}: x has {cols} columns, not a multiple of 256 ({name} blocks)")
    if row_bytes != cols // 256 * block_bytes:
        raise ValueError(f"{who}: {name} rows of {cols} elements need {cols // 256 * block_bytes} bytes, "
                         f"w has {row_bytes} bytes per row")
    if out_n != n or out_rows != rows:
        raise ValueError(f"{who}: out must be float32[{n}, {rows}], got shape [{out_n}, {out_rows}]")
    return 0
