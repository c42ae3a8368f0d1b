"""Rows to Arrow tables with a lake table's declared schema."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from fiberlake.schemas.tables import SCHEMAS


def rows_to_table(rows: list[dict], name: str) -> pa.Table:
    """Arrow table of ``rows`` with the declared schema of table ``name``.

    List columns are built from numpy arrays without a copy per row; a nullable list column
    (the deconvolution's resolution data) goes through Python lists.
    """
    schema = SCHEMAS[name]
    columns = {}
    for field_ in schema:
        values = [r[field_.name] for r in rows]
        if pa.types.is_list(field_.type) and any(v is None for v in values):
            columns[field_.name] = pa.array([None if v is None else np.asarray(v).tolist() for v in values],
                                            type=field_.type)
        elif pa.types.is_list(field_.type):
            flat = np.concatenate(values) if values else np.array([], dtype=field_.type.value_type.to_pandas_dtype())
            offsets = np.arange(len(values) + 1, dtype=np.int32) * (len(values[0]) if values else 0)
            columns[field_.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=field_.type.value_type))
        else:
            columns[field_.name] = pa.array(values, type=field_.type)
    return pa.table(columns, schema=schema)
