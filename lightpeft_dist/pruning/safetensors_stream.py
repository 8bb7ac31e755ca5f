"""Read and write safetensors files one tensor at a time, so pruning a checkpoint needs memory for one tensor.

`safetensors.torch.save_file` needs every tensor of a shard in memory and then copies each one to bytes (twice the
pruned shard), and `safe_open` memory-maps the input, whose touched pages stay resident (and count toward the
process's RSS) until the file is closed: together about one input shard plus two output shards. Here the output header
is written first (shapes are known from the plan before any data is read), then each tensor's bytes as it is produced;
inputs are read with plain positioned reads, and tensors that pass through unchanged are copied in fixed-size chunks.
The format is the published safetensors layout: u64 little-endian header length, JSON header, raw little-endian data.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from ..errors import LightPeftError

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}
CHUNK = 16 << 20


class ShardReader:
    """Tensors of one safetensors file by name, read on demand without mapping the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open(self.path, "rb")
        try:
            (n,) = struct.unpack("<Q", self.file.read(8))
            header = json.loads(self.file.read(n))
        except (struct.error, ValueError) as exc:
            self.file.close()
            raise LightPeftError(f"{self.path} is not a valid safetensors file ({exc}); re-download or re-convert it")
        self.metadata = header.pop("__metadata__", None) or {}
        self.start = 8 + n
        self.entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def get(self, name: str) -> torch.Tensor:
        dtype = DTYPES.get(self.dtype(name))
        if dtype is None:
            raise LightPeftError(f"{self.path}: tensor {name} has dtype {self.dtype(name)}, which cannot be sliced")
        buf = bytearray(self.nbytes(name))
        if buf:
            self.file.seek(self.start + self.entries[name]["data_offsets"][0])
            if self.file.readinto(buf) != len(buf):
                raise LightPeftError(f"{self.path} is truncated (tensor {name}); re-download or re-convert it")
            return torch.frombuffer(buf, dtype=dtype).reshape(self.shape(name))
        return torch.empty(self.shape(name), dtype=dtype)

    def copy_to(self, name: str, writer: "ShardWriter") -> None:
        """Pass a tensor through unchanged, in chunks, without building it."""
        writer.begin(name, self.nbytes(name))
        self.file.seek(self.start + self.entries[name]["data_offsets"][0])
        left = self.nbytes(name)
        while left:
            block = self.file.read(min(CHUNK, left))
            if not block:
                raise LightPeftError(f"{self.path} is truncated (tensor {name}); re-download or re-convert it")
            writer.file.write(block)
            left -= len(block)
        writer.end(name)


def element_size(dtype: str) -> int:
    if dtype in DTYPES:
        return torch.empty((), dtype=DTYPES[dtype]).element_size()
    raise LightPeftError(f"unsupported safetensors dtype {dtype}")


class ShardWriter:
    """A safetensors file whose tensors (name, dtype, shape) are declared up front and then written in that order."""

    def __init__(self, path: str | Path, entries: list[tuple[str, str, list[int]]], metadata: dict[str, str]):
        self.path, self.order, self.next = Path(path), [e[0] for e in entries], 0
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self.sizes, self.shapes = {}, {}
        for name, dtype, shape in entries:
            self.shapes[name] = list(shape)
            size = math.prod(shape) * element_size(dtype)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.sizes[name] = size
            offset += size
        self.total = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.written = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.file.close()
        if exc_type is None and self.next != len(self.order):
            raise LightPeftError(f"{self.path}: {len(self.order) - self.next} declared tensors were never written")

    def begin(self, name: str, nbytes: int) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise LightPeftError(f"{self.path}: tensor {name} written out of the declared order")
        if nbytes != self.sizes[name]:
            raise LightPeftError(f"{self.path}: tensor {name} has {nbytes} bytes, {self.sizes[name]} declared")

    def end(self, name: str) -> None:
        self.next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        if list(t.shape) != self.shapes.get(name, list(t.shape)):
            raise LightPeftError(f"{self.path}: tensor {name} has shape {list(t.shape)}, {self.shapes[name]} declared")
        self.begin(name, t.numel() * t.element_size())
        if t.numel():
            self.file.write(t.view(-1).view(torch.uint8).numpy())  # buffer protocol: no extra copy
        self.end(name)
