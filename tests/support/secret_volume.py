"""A Kubernetes Secret volume as the kubelet writes and updates it, in a local folder."""

from __future__ import annotations

import os
from pathlib import Path


class SecretVolume:
    """A mounted Secret as the kubelet lays it out (its AtomicWriter): the data in a timestamped
    folder, `..data` a symlink to it, and each key a symlink through `..data`. An update writes a
    new timestamped folder, points a new `..data_tmp` symlink at it, renames that over `..data`
    (atomic) and removes the old folder."""

    def __init__(self, mount: Path, set_mtime=None) -> None:
        """`set_mtime(path, seconds_ago)` ages each file written (default: as written)."""
        self.mount, self.set_mtime, self.version = mount, set_mtime, 0
        mount.mkdir()

    def write(self, files: dict[str, str], mtime_ns: int | None = None) -> None:
        self.version += 1
        folder = self.mount / f"..2026_12_05_01_{self.version:02d}_00.{1000 + self.version}"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
            if mtime_ns is None:
                if self.set_mtime:
                    self.set_mtime(folder / name, 10.0)
            else:
                os.utime(folder / name, ns=(mtime_ns, mtime_ns))
        data = self.mount / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.mount / "..data_tmp"
        os.symlink(folder.name, tmp)
        os.rename(tmp, data)
        for name in files:
            if not (self.mount / name).is_symlink():
                os.symlink(f"..data/{name}", self.mount / name)
        if old:
            for child in (self.mount / old).iterdir():
                child.unlink()
            (self.mount / old).rmdir()
