"""Content hashes of data frames: dataset versions (training sets, online snapshots) in one place."""

from __future__ import annotations

import hashlib
import json

import pandas as pd


def content_hash(frame: pd.DataFrame) -> str:
    """A stable content hash of a data frame (row order and dtypes included)."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.sha256(hashed.tobytes())
    digest.update(json.dumps([str(c) for c in frame.columns] + [str(t) for t in frame.dtypes]).encode())
    return digest.hexdigest()[:16]
