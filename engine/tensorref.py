"""Tensors as metadata: dtype, shape, stride and where their bytes live; no tensor bytes are read here."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

# storage class name (as pickled by torch.save) -> (dtype name, item size)
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexFloatStorage": ("complex64", 8),
    "ComplexDoubleStorage": ("complex128", 16),
    "Float8_e4m3fnStorage": ("float8_e4m3fn", 1),
    "Float8_e5m2Storage": ("float8_e5m2", 1),
}

ITEMSIZE: dict[str, int] = {name: size for name, size in STORAGE_DTYPES.values()}
ITEMSIZE.update({"uint16": 2, "uint32": 4, "uint64": 8})

SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int8": "int8"}


class DType(str):
    """A torch dtype named by its short torch name ('float32'); a str so it compares and prints plainly."""

    @property
    def itemsize(self) -> int:
        return ITEMSIZE.get(str(self), 0)


class Size(tuple):
    """torch.Size without torch."""

    def __repr__(self) -> str:
        return f"Size({list(self)})"


@dataclass(frozen=True)
class StorageStub:
    """What a pickle's persistent id names: one storage record of the zip."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor inside a torch zip file, described without reading it."""

    file: str
    storage_key: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    storage_numel: int
    base_offset: int = 0  # where the torch zip starts inside `file` (non-zero for DCP chunks)
    base_length: int | None = None  # that zip's length when it is embedded in a larger file

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE.get(self.dtype, 0)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for dim, st in zip(reversed(self.shape), reversed(self.stride)):
            if dim != 1 and st != expected:
                return False
            expected *= dim
        return True

    def extent(self) -> int:
        """One past the last storage element this tensor touches."""
        if self.numel == 0:
            return self.storage_offset
        return self.storage_offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride)) + 1

    def __repr__(self) -> str:
        return f"Tensor{list(self.shape)}:{self.dtype}"
