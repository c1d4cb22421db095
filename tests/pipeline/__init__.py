import numpy as np
import pyarrow as pa


def table(texts, **extra) -> pa.Table:
    """An input table as the stages get it: an int64 id and a string text column (plus `extra`)."""
    return pa.table({"id": pa.array(np.arange(len(texts)), pa.int64()), "text": pa.array(texts, pa.string()), **extra})
