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
_TAIL = 4096  # the end record sits at the very end (torch writes no zip comment); a larger directory is read apart
_SMALL = 16384  # files up to this size are read whole in one call (directory and pickle together)


def _read_exact(fh, size: int) -> bytes:
    """Up to `size` bytes (fewer only at the end of the file) from an unbuffered file."""
    if size <= 0:
        return b""
    data = fh.read(size)
    if data is None or len(data) == size or not data:
        return data or b""
    parts = [data]
    got = len(data)
    while got < size:
        more = fh.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


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
        if base_offset < 0 or self.length < 0 or base_offset + self.length > self.file_size:
            raise CheckpointError(self.path, f"zip range {base_offset}+{self.length} lies outside the file")
        self.bytes_read = 0
        self.records: dict[str, ZipRecord] = {}
        self.prefix = ""
        self._data_offsets: dict[str, int] = {}
        self._lock = threading.Lock()
        self._tail = b""  # the last bytes of the zip, kept to serve small records without another read
        self._tail_start = 0  # offset of _tail inside the zip
        try:
            with open(self.path, "rb", buffering=0) as fh:  # unbuffered: read only what is asked
                self._read_directory(fh)
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot read ({exc.strerror or exc})") from None
        except (struct.error, IndexError, ValueError, OverflowError) as exc:
            raise CheckpointError(self.path, f"zip directory is corrupt ({exc})") from None

    # -- directory -----------------------------------------------------------------------------
    def _read_directory(self, fh) -> None:
        if self.length < 22:
            if self.length == 0:
                raise CheckpointError(self.path, "file is empty (0 bytes): not a torch checkpoint")
            raise CheckpointError(self.path, "file is too small to be a torch checkpoint (truncated?)")
        tail_len = self.length if self.length <= _SMALL else _TAIL
        fh.seek(self.base + self.length - tail_len)
        tail = _read_exact(fh, tail_len)
        self.bytes_read += len(tail)
        if len(tail) != tail_len:
            raise CheckpointError(self.path, "file is shorter than its size says (changed while reading?)")
        self._tail, self._tail_start = tail, self.length - tail_len
        pos = tail.rfind(_EOCD_SIG, max(0, len(tail) - 22 - 0xFFFF))
        if pos < 0 or pos + 22 > len(tail):
            fh.seek(self.base)
            head = _read_exact(fh, 8)
            self.bytes_read += len(head)
            if head[:1] == b"\x80":
                raise CheckpointError(
                    self.path,
                    "legacy (non-zip) torch serialization is not supported; re-save it with torch >= 1.6",
                )
            if head[:4] == _LOCAL_SIG:
                raise CheckpointError(self.path, "zip end record missing: the file is truncated")
            raise CheckpointError(self.path, "not a torch zip checkpoint (no zip end record)")
        (_, _, _, _, count, cd_size, cd_offset, _) = struct.unpack_from("<4sHHHHIIH", tail, pos)
        if count == 0xFFFF or cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
            loc = tail.rfind(_EOCD64_LOC_SIG, 0, pos)
            if loc < 0 or loc + 20 > len(tail):
                raise CheckpointError(self.path, "zip64 locator missing: the file is corrupt")
            (_, _, eocd64_off, _) = struct.unpack_from("<4sIQI", tail, loc)
            rec = self._read_at(fh, eocd64_off, 56)
            if rec[:4] != _EOCD64_SIG or len(rec) < 56:
                raise CheckpointError(self.path, "zip64 end record corrupt")
            (_, _, _, _, _, _, _, count, cd_size, cd_offset) = struct.unpack_from("<4sQHHIIQQQQ", rec)
        if cd_offset + cd_size > self.length:
            raise CheckpointError(
                self.path,
                f"truncated: central directory at {cd_offset}+{cd_size} lies past the end ({self.length} bytes)",
            )
        if count * 46 > cd_size:
            raise CheckpointError(self.path, f"zip central directory is corrupt ({count} entries in {cd_size} bytes)")
        cdir = self._read_at(fh, cd_offset, cd_size)
        if len(cdir) != cd_size:
            raise CheckpointError(self.path, "zip central directory is truncated")
        self._parse_cdir(cdir, count)

    def _read_at(self, fh, offset: int, size: int) -> bytes:
        """`size` bytes at zip offset `offset`; the part the kept tail covers is not read again."""
        tail_start, tail = self._tail_start, self._tail
        rel = offset - tail_start
        if 0 <= rel and rel + size <= len(tail):
            return tail[rel : rel + size]
        end = offset + size
        if offset < tail_start < end <= tail_start + len(tail):
            head = self._read_at(fh, offset, tail_start - offset)
            return head + tail[: end - tail_start] if len(head) == tail_start - offset else head
        fh.seek(self.base + offset)
        data = _read_exact(fh, size)
        self.bytes_read += len(data)
        return data

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
        if rec.compressed:
            raise CheckpointError(self.path, f"storage record data/{key} is compressed; torch never writes that")
        return rec

    def data_offset(self, rec: ZipRecord) -> int:
        """Absolute file offset of the first byte of a record's data (reads its 30-byte local header once)."""
        with self._lock:
            off = self._data_offsets.get(rec.name)
        if off is not None:
            return off
        head = self._read_span(rec.header_offset, 30)
        self._check_local(rec, head)
        nlen, xlen = struct.unpack_from("<HH", head, 26)
        off = self.base + rec.header_offset + 30 + nlen + xlen
        if off - self.base + rec.size > self.length:
            raise CheckpointError(self.path, f"record {rec.name} extends past the end of the file (truncated)")
        with self._lock:
            self._data_offsets[rec.name] = off
        return off

    def _check_local(self, rec: ZipRecord, head: bytes) -> None:
        if len(head) < 30 or head[:4] != _LOCAL_SIG:
            raise CheckpointError(self.path, f"record {rec.name} has a corrupt local header (truncated file?)")

    def _read_span(self, offset: int, size: int) -> bytes:
        try:
            with open(self.path, "rb", buffering=0) as fh:  # unbuffered: read only what is asked
                return self._read_at(fh, offset, size)
        except OSError as exc:
            raise CheckpointError(self.path, f"cannot read ({exc.strerror or exc})") from None

    def read_record(self, name: str) -> bytes:
        """Read a small record (e.g. data.pkl) whole: one read for its local header and data together."""
        rec = self.records.get(name) or self.records.get(self.prefix + name)
        if rec is None:
            raise CheckpointError(self.path, f"record {name} is missing")
        if rec.compressed:
            raise CheckpointError(self.path, f"record {name} is compressed; torch never writes that")
        if rec.header_offset + 30 + rec.size > self.length:
            raise CheckpointError(self.path, f"record {rec.name} extends past the end of the file (truncated)")
        # the local name usually equals the central one; torch pads data records with an extra field, so read a
        # little more than the minimum and fall back to a second read when the extra field is longer
        guess = 30 + len(rec.name.encode()) + 128
        blob = self._read_span(rec.header_offset, min(guess + rec.size, self.length - rec.header_offset))
        self._check_local(rec, blob[:30])
        nlen, xlen = struct.unpack_from("<HH", blob, 26)
        start = 30 + nlen + xlen
        with self._lock:
            self._data_offsets[rec.name] = self.base + rec.header_offset + start
        data = blob[start : start + rec.size]
        if len(data) != rec.size and start + rec.size <= self.length - rec.header_offset:
            data = self._read_span(rec.header_offset + start, rec.size)
        if len(data) != rec.size:
            raise CheckpointError(self.path, f"record {name} is truncated")
        return data

    def pickle_bytes(self) -> bytes:
        return self.read_record(self.prefix + "data.pkl")


class MappedFile:
    """A read-only mmap of a whole file, shared by the tensors viewed from it."""

    _cache: dict[str, MappedFile] = {}
    _cache_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.size = size

    @classmethod
    def open(cls, path: str) -> MappedFile:
        with cls._cache_lock:
            mf = cls._cache.get(path)
            if mf is None:
                mf = cls(path)
                cls._cache[path] = mf
            return mf

    @classmethod
    def release_pages(cls) -> None:
        """Drop this process's resident pages of every cached map (the page cache keeps them): call between items,
        so a worker's resident memory follows the item it works on, not everything it has read."""
        with cls._cache_lock:
            maps = [mf.map for mf in cls._cache.values() if mf.map is not None]
        for m in maps:
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass

    @classmethod
    def forget(cls, path: str | None = None) -> None:
        """Drop cached maps (all, or one path); views still alive keep their map open."""
        with cls._cache_lock:
            if path is None:
                cls._cache.clear()
            else:
                cls._cache.pop(path, None)
