"""Minimal reader of torch zip checkpoints: central directory, record offsets and mmap'd byte ranges."""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

_EOCD_SIG = b"PK\x05\x06"
_EOCD64_LOC_SIG = b"PK\x06\x07"
_EOCD64_SIG = b"PK\x06\x06"
_CDIR_SIG = b"PK\x01\x02"
_LOCAL_SIG = b"PK\x03\x04"
_TAIL = 1 << 16


@dataclass(frozen=True)
class ZipRecord:
    """One stored (uncompressed) member of a torch zip file."""

    name: str
    header_offset: int
    size: int
    compressed: bool


class TorchZip:
    """The directory of one torch zip file, read from its tail without touching tensor bytes."""

    def __init__(self, path: str | Path, *, base_offset: int = 0, length: int | None = None) -> None:
        self.path = str(path)
        self.base = base_offset
        try:
            self.file_size = os.path.getsize(self.path)
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot stat file ({exc.strerror})") from None
        self.length = self.file_size - base_offset if length is None else length
        self.bytes_read = 0
        self.records: dict[str, ZipRecord] = {}
        self.prefix = ""
        self._data_offsets: dict[str, int] = {}
        self._lock = threading.Lock()
        with open(self.path, "rb") as fh:
            self._read_directory(fh)

    # -- directory -----------------------------------------------------------------------------
    def _read_directory(self, fh) -> None:
        if self.length < 22:
            raise CheckpointError(self.path, "file is too small to be a torch checkpoint (truncated?)")
        tail_len = min(self.length, _TAIL)
        fh.seek(self.base + self.length - tail_len)
        tail = fh.read(tail_len)
        self.bytes_read += len(tail)
        pos = tail.rfind(_EOCD_SIG)
        if pos < 0:
            with open(self.path, "rb") as probe:
                probe.seek(self.base)
                head = probe.read(4)
            if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
                raise CheckpointError(
                    self.path,
                    "legacy (non-zip) torch serialization is not supported; re-save it with torch >= 1.6",
                )
            if head == _LOCAL_SIG:
                raise CheckpointError(self.path, "zip end record missing: the file is truncated")
            raise CheckpointError(self.path, "not a torch zip checkpoint (no zip end record)")
        (_, _, _, _, count, cd_size, cd_offset, _) = struct.unpack_from("<4sHHHHIIH", tail, pos)
        if count == 0xFFFF or cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
            loc = tail.rfind(_EOCD64_LOC_SIG, 0, pos)
            if loc < 0:
                raise CheckpointError(self.path, "zip64 locator missing: the file is corrupt")
            (_, _, eocd64_off, _) = struct.unpack_from("<4sIQI", tail, loc)
            rel = eocd64_off - (self.length - tail_len)
            if rel < 0:
                fh.seek(self.base + eocd64_off)
                rec = fh.read(56)
                self.bytes_read += 56
            else:
                rec = tail[rel : rel + 56]
            if rec[:4] != _EOCD64_SIG:
                raise CheckpointError(self.path, "zip64 end record corrupt")
            (_, _, _, _, _, _, _, count, cd_size, cd_offset) = struct.unpack_from("<4sQHHIIQQQQ", rec)
        if cd_offset + cd_size > self.length:
            raise CheckpointError(
                self.path,
                f"truncated: central directory at {cd_offset}+{cd_size} lies past the end ({self.length} bytes)",
            )
        rel = cd_offset - (self.length - tail_len)
        if rel >= 0:
            cdir = tail[rel : rel + cd_size]
        else:
            fh.seek(self.base + cd_offset)
            cdir = fh.read(cd_size)
            self.bytes_read += len(cdir)
        self._parse_cdir(cdir, count)

    def _parse_cdir(self, cdir: bytes, count: int) -> None:
        p = 0
        for _ in range(count):
            if cdir[p : p + 4] != _CDIR_SIG:
                raise CheckpointError(self.path, "zip central directory is corrupt")
            (method, _t, _d, _crc, csize, usize, nlen, xlen, clen) = struct.unpack_from(
                "<HHHIIIHHH", cdir, p + 10
            )
            (hoff,) = struct.unpack_from("<I", cdir, p + 42)
            name = cdir[p + 46 : p + 46 + nlen].decode("utf-8", "replace")
            extra = cdir[p + 46 + nlen : p + 46 + nlen + xlen]
            if usize == 0xFFFFFFFF or csize == 0xFFFFFFFF or hoff == 0xFFFFFFFF:
                usize, csize, hoff = self._zip64_extra(extra, usize, csize, hoff)
            self.records[name] = ZipRecord(name, hoff, usize, method != 0)
            p += 46 + nlen + xlen + clen
        pkl = [n for n in self.records if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError(self.path, "zip file has no data.pkl: not a torch checkpoint")
        self.prefix = pkl[0][: -len("data.pkl")]

    def _zip64_extra(self, extra: bytes, usize: int, csize: int, hoff: int) -> tuple[int, int, int]:
        p = 0
        while p + 4 <= len(extra):
            tag, size = struct.unpack_from("<HH", extra, p)
            if tag == 1:
                q = p + 4
                if usize == 0xFFFFFFFF:
                    (usize,) = struct.unpack_from("<Q", extra, q)
                    q += 8
                if csize == 0xFFFFFFFF:
                    (csize,) = struct.unpack_from("<Q", extra, q)
                    q += 8
                if hoff == 0xFFFFFFFF:
                    (hoff,) = struct.unpack_from("<Q", extra, q)
                break
            p += 4 + size
        return usize, csize, hoff

    # -- records -------------------------------------------------------------------------------
    def storage_record(self, key: str) -> ZipRecord:
        """The record holding storage `key` (the name pickles use for it)."""
        rec = self.records.get(f"{self.prefix}data/{key}")
        if rec is None:
            raise CheckpointError(self.path, f"storage record data/{key} is missing (truncated or corrupt file)")
        return rec

    def data_offset(self, rec: ZipRecord) -> int:
        """Absolute file offset of the first byte of a record's data (reads its 30-byte local header once)."""
        with self._lock:
            off = self._data_offsets.get(rec.name)
        if off is not None:
            return off
        with open(self.path, "rb") as fh:
            fh.seek(self.base + rec.header_offset)
            head = fh.read(30)
        self.bytes_read += len(head)
        if len(head) < 30 or head[:4] != _LOCAL_SIG:
            raise CheckpointError(self.path, f"record {rec.name} has a corrupt local header (truncated file?)")
        nlen, xlen = struct.unpack_from("<HH", head, 26)
        off = self.base + rec.header_offset + 30 + nlen + xlen
        if off - self.base + rec.size > self.length:
            raise CheckpointError(self.path, f"record {rec.name} extends past the end of the file (truncated)")
        with self._lock:
            self._data_offsets[rec.name] = off
        return off

    def read_record(self, name: str) -> bytes:
        """Read a small record (e.g. data.pkl) whole."""
        rec = self.records.get(name) or self.records.get(self.prefix + name)
        if rec is None:
            raise CheckpointError(self.path, f"record {name} is missing")
        if rec.compressed:
            raise CheckpointError(self.path, f"record {name} is compressed; torch never writes that")
        off = self.data_offset(rec)
        with open(self.path, "rb") as fh:
            fh.seek(off)
            data = fh.read(rec.size)
        self.bytes_read += len(data)
        if len(data) != rec.size:
            raise CheckpointError(self.path, f"record {name} is truncated")
        return data

    def pickle_bytes(self) -> bytes:
        return self.read_record(self.prefix + "data.pkl")


class MappedFile:
    """A read-only mmap of a whole file, shared by the tensors viewed from it."""

    _cache: dict[str, "MappedFile"] = {}
    _cache_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.size = size

    @classmethod
    def open(cls, path: str) -> "MappedFile":
        with cls._cache_lock:
            mf = cls._cache.get(path)
            if mf is None:
                mf = cls(path)
                cls._cache[path] = mf
            return mf

    @classmethod
    def forget(cls, path: str | None = None) -> None:
        """Drop cached maps (all, or one path); views still alive keep their map open."""
        with cls._cache_lock:
            if path is None:
                cls._cache.clear()
            else:
                cls._cache.pop(path, None)
