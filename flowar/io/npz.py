""".npz files numpy.load reads, written atomically and byte-reproducibly (a bulk run's shards and its
samples.npz)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flowar.io.files import atomic_write_bytes


@dataclass(frozen=True)
class Parts:
    """One array of ``shape`` and ``dtype`` given as parts along its first axis, each a function that
    returns it (read when written, one at a time): a 50,000-image samples.npz was concatenated in
    memory and copied once more while written, three times its 9.8 GB."""
    shape: tuple
    dtype: object
    parts: list[Callable]


def write_npz(path: str | Path, arrays: dict) -> None:
    """An uncompressed ``.npz`` that ``numpy.load`` reads, written atomically and byte-reproducibly
    (``numpy.savez`` stamps each member with the current time; this stamps 1980-01-01); a value is
    an array or :class:`Parts`."""
    import io
    import zipfile

    import numpy as np

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                if not isinstance(arr, Parts):
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                    zf.writestr(info, buf.getvalue())
                    continue
                dtype, rows = np.dtype(arr.dtype), 0
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                             "fortran_order": False, "shape": tuple(arr.shape)})
                    for part in arr.parts:
                        a = np.ascontiguousarray(part())
                        if a.dtype != dtype or a.shape[1:] != tuple(arr.shape[1:]):
                            raise ValueError(f"a part of {name} of {a.dtype} {a.shape}, not {dtype} (n, *{arr.shape[1:]})")
                        f.write(a.data)
                        rows += a.shape[0]
                        del a                       # (released before the next part is read)
                if rows != arr.shape[0]:
                    raise ValueError(f"{name}: parts of {rows} rows, not {arr.shape[0]}")
    atomic_write_bytes(path, write)
