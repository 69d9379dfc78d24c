"""A GGUF file's header (metadata and tensor infos) parsed directly, and its tensors as memory-mapped arrays.

`gguf.GGUFReader` builds a numpy view for every part of every metadata field: for the 49k-token vocabulary
and 48k merges of SmolLM2 that took ~4 s on a 2-core host, paid once for the config and again for the
tokenizer at every model load. This reads the same header with `struct` in a fraction of a second and hands
out each tensor's data shaped as GGUFReader does (what `gguf.quants.dequantize` expects).

Layout (little-endian, versions 2 and 3): magic "GGUF", version u32, tensor count u64, metadata count u64;
metadata entries (key string, value type u32, value); tensor infos (name, n_dims u32, dims u64 x n_dims in
ggml order, type u32, offset u64); padding to `general.alignment` (default 32); tensor data. A string is a
u64 byte length and UTF-8 bytes; an array is an item type u32, a count u64 and the items.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
# Fixed-size value types: GGUF type id -> struct format (little-endian).
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# Tensor types stored as plain arrays (the rest are quantized blocks, read as bytes).
PLAIN_TYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order (innermost first), as stored
    type: GGMLQuantizationType
    data_offset: int  # absolute, in the file


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    metadata: dict[str, Any]  # scalars as Python values, strings as str, arrays as lists
    tensors: list[TensorInfo]


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the header of the GGUF file at `path`; ValueError (or OSError) when it is not a whole one."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        try:
            return _parse(path, view)
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise ValueError(f"truncated or corrupt GGUF header ({type(exc).__name__}: {exc})") from exc


def tensor_data(path: str | Path, tensors: list[TensorInfo]) -> dict[str, np.ndarray]:
    """Each tensor's data, memory-mapped read-only: plain types as arrays of their dtype shaped like the
    tensor (numpy order), quantized ones as bytes shaped [..., row bytes] (as GGUFReader's `tensor.data`)."""
    data = np.memmap(path, mode="r")
    arrays = {}
    for tensor in tensors:
        shape = tuple(reversed(tensor.dims))
        count = int(np.prod(shape, dtype=np.int64))
        block_size, type_size = GGML_QUANT_SIZES[tensor.type]
        num_bytes = count * type_size // block_size
        if tensor.data_offset + num_bytes > data.size:
            raise ValueError(f"tensor {tensor.name} runs past the end of the file")
        raw = data[tensor.data_offset : tensor.data_offset + num_bytes]
        plain = PLAIN_TYPES.get(tensor.type)
        if plain is not None:
            arrays[tensor.name] = raw.view(plain).reshape(shape)
        else:
            arrays[tensor.name] = raw.reshape(quant_shape_to_byte_shape(shape, tensor.type))
    return arrays


def _parse(path: Path, view: mmap.mmap) -> GGUFHeader:
    if view[:4] != MAGIC:
        raise ValueError("not a GGUF file (bad magic)")
    (version,) = struct.unpack_from("<I", view, 4)
    if version not in VERSIONS:
        big_endian = version & 0xFFFF == 0
        raise ValueError("big-endian GGUF files are not supported" if big_endian else f"GGUF version {version}")
    num_tensors, num_fields = struct.unpack_from("<QQ", view, 8)
    reader = _Cursor(view, 24)
    metadata = {}
    for _ in range(num_fields):
        key = reader.string()
        metadata[key] = reader.value(reader.unpack("<I"))
    infos = []
    for _ in range(num_tensors):
        name = reader.string()
        num_dims = reader.unpack("<I")
        dims = struct.unpack_from(f"<{num_dims}Q", view, reader.offset)
        reader.offset += 8 * num_dims
        type_id, offset = reader.unpack("<I"), reader.unpack("<Q")
        infos.append((name, dims, GGMLQuantizationType(type_id), offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    start = -(-reader.offset // alignment) * alignment
    if len({name for name, *_ in infos}) != len(infos):
        raise ValueError("duplicated tensor names")
    tensors = [TensorInfo(name, dims, kind, start + offset) for name, dims, kind, offset in infos]
    return GGUFHeader(path, metadata, tensors)


class _Cursor:
    """Reads GGUF values from `view` at `offset`, moving past each."""

    def __init__(self, view: mmap.mmap, offset: int) -> None:
        self.view, self.offset = view, offset

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.view, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        end = self.offset + length
        if end > len(self.view):
            raise IndexError("string runs past the end of the file")
        text = self.view[self.offset : end].decode("utf-8")
        self.offset = end
        return text

    def value(self, type_id: int) -> Any:
        if type_id in SCALARS:
            return self.unpack(SCALARS[type_id])
        if type_id == STRING:
            return self.string()
        if type_id != ARRAY:
            raise ValueError(f"unknown GGUF value type {type_id}")
        item_type, count = self.unpack("<I"), self.unpack("<Q")
        if item_type in SCALARS and item_type != 7:  # numbers: one numpy read
            dtype = np.dtype(SCALARS[item_type])
            if self.offset + count * dtype.itemsize > len(self.view):
                raise IndexError("array runs past the end of the file")
            items = np.frombuffer(self.view, dtype, count, self.offset).tolist()
            self.offset += count * dtype.itemsize
            return items
        return [self.value(item_type) for _ in range(count)]
