"""Deterministic HDF5 tables: the same data gives the same bytes (no timestamps stored)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd


def write_columns(group: h5py.Group, columns: dict[str, np.ndarray]) -> None:
    """One dataset per column; strings as fixed-length bytes so h5py needs no object dtype."""
    for name, values in columns.items():
        array = np.asarray(values)
        if array.dtype.kind in "OU":
            array = array.astype("S")
        group.create_dataset(name, data=array, track_times=False)


def write_frame(group: h5py.Group, frame: pd.DataFrame) -> None:
    write_columns(group, {name: frame[name].to_numpy() for name in frame.columns})


def read_frame(group: h5py.Group) -> pd.DataFrame:
    columns = {}
    for name, dataset in group.items():
        values = dataset[()]
        columns[name] = values.astype(str) if values.dtype.kind == "S" else values
    return pd.DataFrame(columns)


def open_for_write(path: Path) -> h5py.File:
    """Open an H5 file for writing with a fixed format version, so bytes do not depend on defaults."""
    return h5py.File(path, "w", libver=("earliest", "v110"), track_order=False)
