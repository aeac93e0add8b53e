"""Lazy reads of HF safetensors checkpoints (one file or a sharded set with an index).

The safetensors format is parsed here directly: an 8-byte little-endian header length, a JSON
header mapping each tensor name to ``{"dtype", "shape", "data_offsets"}`` (offsets relative to the
end of the header), then the raw little-endian data. Files are memory-mapped and each ``read``
touches only that tensor's bytes, so a model loads one tensor at a time without holding the whole
checkpoint in memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# A larger header is a corrupt file, not a real checkpoint (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

# On-disk dtype -> numpy dtype of the stored bytes. BF16 is stored as uint16 and widened on read.
_DISK_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
_READ_DTYPES = ("float32", "float16", "float64")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match the model; the message names the tensor/file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Exact widening: a bf16 value is the high 16 bits of the float32 with the same value."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One ``*.safetensors`` file: the parsed header and lazy, memory-mapped tensor reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors = self._parse_header(path)
        self._mmap: np.memmap | None = None

    @staticmethod
    def _parse_header(path: Path) -> dict[str, TensorInfo]:
        file_size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path.name}: truncated file ({file_size} bytes, no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise CheckpointError(
                    f"{path.name}: truncated or corrupt file (header of {header_len} bytes, "
                    f"file of {file_size} bytes)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path.name}: header is not valid JSON: {e}") from e
        data_start = 8 + header_len
        header.pop("__metadata__", None)
        tensors = {name: _tensor_info(path.name, name, entry, data_start) for name, entry in header.items()}
        for name, info in tensors.items():
            if info.end > file_size:
                raise CheckpointError(
                    f"{path.name}: truncated file: tensor {name!r} ends at byte {info.end}, "
                    f"file has {file_size} bytes"
                )
        return tensors

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor as stored (BF16 as uint16), a view of the memory map."""
        info = self.tensors[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        flat = self._mmap[info.begin : info.end].view(_DISK_DTYPES[info.dtype])
        return flat.reshape(info.shape)


def _tensor_info(file_name: str, name: str, entry: dict, data_start: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file_name}: malformed header entry for tensor {name!r}: {entry!r}") from e
    if dtype not in _DISK_DTYPES:
        raise CheckpointError(
            f"{file_name}: tensor {name!r} has unsupported dtype {dtype!r} "
            f"(supported: {sorted(_DISK_DTYPES)})"
        )
    expected = math.prod(shape) * _DISK_DTYPES[dtype].itemsize
    if begin < 0 or end - begin != expected:
        raise CheckpointError(
            f"{file_name}: tensor {name!r} spans bytes [{begin}, {end}) but "
            f"{dtype}{list(shape)} needs {expected}"
        )
    return TensorInfo(dtype=dtype, shape=shape, begin=data_start + begin, end=data_start + end)


class CheckpointReader:
    """All tensors of a model directory, by HF name, read lazily one at a time."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._files: dict[str, SafetensorsFile] = {}  # shard file name -> parsed file
        self._where: dict[str, str] = {}  # tensor name -> shard file name
        index_path = self.model_dir / INDEX_FILE
        if index_path.is_file():
            self._open_sharded(index_path)
        elif (self.model_dir / SINGLE_FILE).is_file():
            self._open_file(SINGLE_FILE)
            self._where = {name: SINGLE_FILE for name in self._files[SINGLE_FILE].tensors}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.model_dir}")

    def _open_sharded(self, index_path: Path) -> None:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{INDEX_FILE}: no valid 'weight_map': {e}") from e
        for shard in sorted(set(weight_map.values())):
            self._open_file(shard)
        for name, shard in weight_map.items():
            if name not in self._files[shard].tensors:
                raise CheckpointError(
                    f"{INDEX_FILE} lists tensor {name!r} in {shard}, which does not contain it"
                )
        self._where = dict(weight_map)

    def _open_file(self, file_name: str) -> None:
        path = self.model_dir / file_name
        if not path.is_file():
            raise CheckpointError(
                f"shard {file_name} is listed in the index but missing from {self.model_dir}"
            )
        self._files[file_name] = SafetensorsFile(path)

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _info(self, name: str) -> tuple[SafetensorsFile, TensorInfo]:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        file = self._files[self._where[name]]
        return file, file.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[1].shape

    def dtype(self, name: str) -> str:
        """The on-disk dtype name (``F32``, ``F16``, ``BF16``, ``F64``)."""
        return self._info(name)[1].dtype

    def read(self, name: str, dtype: str = "float32") -> np.ndarray:
        """A fresh (not memory-mapped) array of the tensor converted to ``dtype``."""
        if dtype not in _READ_DTYPES:
            raise CheckpointError(f"cannot read tensor {name!r} as {dtype!r} (supported: {_READ_DTYPES})")
        file, info = self._info(name)
        raw = file.read_raw(name)
        if info.dtype == "BF16":
            raw = bf16_to_float32(raw)
        return np.array(raw, dtype=dtype, copy=True)
