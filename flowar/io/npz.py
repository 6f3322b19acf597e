""".npz files numpy.load reads, written atomically and byte-reproducibly (a bulk run's shards and its
samples.npz)."""

from __future__ import annotations

from pathlib import Path

from flowar.io.files import atomic_write_bytes


def write_npz(path: str | Path, arrays: dict) -> None:
    """An uncompressed ``.npz`` that ``numpy.load`` reads, written atomically and byte-reproducibly
    (``numpy.savez`` stamps each member with the current time; this stamps 1980-01-01)."""
    import io
    import zipfile

    import numpy as np

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue())
    atomic_write_bytes(path, write)
