"""Reading PyTorch checkpoint files (.pth/.pt/.bin) with NumPy only, and without running their code.

`load_torch_checkpoint(path)` returns what `torch.load(path, weights_only=True)`
would, with every tensor as a NumPy array: dicts, `OrderedDict`s, lists,
tuples, strings and numbers as they were saved.

The two formats `torch.save` writes:

- the zip format (PyTorch >= 1.6): a zip archive with one top folder, whose
  name varies (`archive/`, or the file's stem), holding `data.pkl` (the pickled
  object), `data/<key>` (the raw bytes of each storage), `byteorder` ("little"
  or "big"; little when absent) and `version`. `data.pkl` names each storage
  by the persistent id `("storage", storage_type, key, location, numel)`.
- the legacy format (`_use_new_zipfile_serialization=False`, and PyTorch
  < 1.6): five pickles one after the other (the magic number
  0x1950A86A20F9469CFC6C, the protocol version 1001, a sys-info dict, the
  object, whose storages are the persistent ids `("storage", storage_type,
  root_key, location, numel, view_metadata)`, then the sorted list of storage
  keys), then each storage in that order as an int64 little-endian element
  count followed by its raw little-endian bytes.

A tensor is the pickled call `torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`
(`_rebuild_tensor` in PyTorch 0.3, `_rebuild_tensor_v3(..., dtype)` for
uint16/32/64, which have no typed storage); it comes back as a NumPy view of its
storage with the same shape, strides (in bytes) and offset, so tensors that
shared a storage in torch share memory here. bfloat16 becomes float32 (NumPy
has no bfloat16), a big-endian file is converted to native byte order, and a
parameter (`_rebuild_parameter`) is its array. PyTorch 0.1-0.3 tar checkpoints
are refused with one line.

Security rule: unpickling calls whatever callable a pickle names, so a
checkpoint can run any code (`os.system`, `builtins.eval`, a class's
`__reduce__`). `_RestrictedUnpickler.find_class` answers only the names a
state dict needs (`_ALLOWED`, the storage types, torch dtypes,
`collections.OrderedDict`) with functions of this module that build
placeholders, never with torch's or Python's own; any other global raises
`ConversionError` before anything is called. Tensors are placeholders until
the whole pickle is read, so no pickle opcode can reach a NumPy array.
"""

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from keras_resnet_settings.errors import ConversionError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
ZIP_MAGIC = b"PK\x03\x04"
# torch dtype name -> NumPy dtype of the bytes on disk (little-endian); bfloat16 is widened afterwards.
TORCH_DTYPES = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1",
    "uint64": "<u8", "uint32": "<u4", "uint16": "<u2", "uint8": "u1",
    "bool": "?", "complex128": "<c16", "complex64": "<c8",
}
# Storage class name (module torch, torch.cuda or torch.storage) -> torch dtype name.
STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "UntypedStorage": "uint8",
}
STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")
REFUSED = (
    "{path} holds a pickled {name}, which keras_resnet does not load: unpickling arbitrary objects can execute "
    "code, so only tensors, dicts, lists and numbers are read. Save model.state_dict() instead (or convert it to "
    ".safetensors) in a session you trust."
)


class _Sealed:
    """Base of what the unpickler hands a pickle: BUILD cannot set attributes on it (`__setattr__` refuses)."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError(f"setting {name!r} on a {type(self).__name__.lstrip('_')}")

    def _set(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)


class _Callable(_Sealed):
    """An allowed global: calls `function`, and cannot be changed by the pickle (unlike a function object)."""

    __slots__ = ("function",)

    def __init__(self, function):
        self._set(function=function)

    def __call__(self, *args):
        return self.function(*args)


class _StorageType(_Sealed):
    """What `find_class` returns for `torch.FloatStorage` & co.: only the torch dtype name."""

    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self._set(dtype=dtype)


class _DType(_Sealed):
    """What `find_class` returns for `torch.uint16` & co. (the dtype argument of `_rebuild_tensor_v3`)."""

    __slots__ = ("name",)

    def __init__(self, name):
        self._set(name=name)


class _Storage(_Sealed):
    """One storage: its dtype, size, byte order and raw bytes (read after the pickle in the legacy format).

    A legacy view storage has `root` (the storage it is a slice of) and
    `root_offset` (in elements) instead of bytes of its own.
    """

    __slots__ = ("arrays", "byteorder", "dtype", "key", "numel", "raw", "root", "root_offset")

    def __init__(self, key, dtype, numel, byteorder="little", root=None, root_offset=0):
        self._set(key=key, dtype=dtype, numel=numel, byteorder=byteorder, raw=None, root=root,
                  root_offset=root_offset, arrays={})  # arrays: torch dtype -> the whole storage, native

    def set_bytes(self, raw):
        """Sets the storage's bytes (a 1-D uint8 array)."""
        self._set(raw=raw)

    def as_array(self, dtype):
        """The whole storage as a 1-D native NumPy array of torch dtype `dtype` (cached, so views share it).

        Args:
            dtype: a key of `TORCH_DTYPES`.

        Returns:
            A writeable 1-D array; bfloat16 is widened to float32.

        Raises:
            ValueError: the storage has no bytes, or not a whole number of elements.
        """
        if dtype not in self.arrays:
            self.arrays[dtype] = _typed(self.bytes(), dtype, self.byteorder)
        return self.arrays[dtype]

    def bytes(self):
        """The storage's raw bytes as a 1-D uint8 array (a slice of the root's for a legacy view).

        Raises:
            ValueError: no bytes were read for it, or a view past its root.
        """
        if self.root is not None:
            size = np.dtype(TORCH_DTYPES[self.dtype]).itemsize
            start, raw = self.root_offset * size, self.root.bytes()
            if start + self.numel * size > raw.size:
                raise ValueError(f"storage view {self.key!r} ends past its root storage {self.root.key!r}")
            return raw[start:start + self.numel * size]
        if self.raw is None:
            raise ValueError(f"storage {self.key!r} has no data")
        return self.raw


class _TensorRef(_Sealed):
    """A tensor until the pickle is read: its storage, offset, shape, strides (in elements) and dtype."""

    __slots__ = ("conjugate", "dtype", "negate", "offset", "size", "storage", "stride")

    def __init__(self, storage, offset, size, stride, dtype, metadata=None):
        metadata = metadata if isinstance(metadata, dict) else {}
        self._set(storage=storage, offset=offset, size=size, stride=stride, dtype=dtype,
                  negate=bool(metadata.get("neg")), conjugate=bool(metadata.get("conj")))


def load_torch_checkpoint(path):
    """Reads a PyTorch checkpoint file without torch and without running its code.

    Args:
        path: a file written by `torch.save` (zip or legacy format).

    Returns:
        The saved object, with every tensor as a NumPy array (`OrderedDict`
        state dicts keep their `_metadata`).

    Raises:
        ConversionError: one line naming `path`: a global other than tensors
            and containers in the pickle (refused before anything runs), a
            PyTorch 0.1-0.3 tar checkpoint, or a file that is not a readable
            checkpoint (truncated, corrupt, another format).
    """
    path = str(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
            if head.startswith(ZIP_MAGIC):
                return _load_zip(path, handle)
            if len(head) > 262 and head[257:262] == b"ustar":
                raise ConversionError(
                    f"{path} is a PyTorch 0.1-0.3 tar checkpoint, which keras_resnet does not read: load it with "
                    "that PyTorch and save model.state_dict() again (or as .safetensors)."
                )
            handle.seek(0)
            return _load_legacy(path, handle)
    except ConversionError:
        raise
    except Exception as error:  # noqa: BLE001 - zipfile, pickle, struct and NumPy raise many types on a bad file
        raise ConversionError(
            f"{path} is not a PyTorch state dict file: it cannot be read ({type(error).__name__}: "
            f"{_first_line(error)})."
        ) from None


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of a tensor state dict, and storages by persistent id.

    Args:
        file: the pickle stream.
        path: the checkpoint, for messages.
        persistent_load: `(saved_id) -> _Storage`, or None for pickles
            without storages (the legacy header pickles).
    """

    def __init__(self, file, path, persistent_load=None):
        super().__init__(file, encoding="utf-8")
        self._path, self._load_storage = path, persistent_load

    def find_class(self, module, name):
        """The callable for `module.name`, if a state dict needs it.

        Raises:
            ConversionError: any other global (nothing of it is imported).
        """
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in STORAGE_MODULES and name in STORAGE_TYPES:
            return _StorageType(STORAGE_TYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return _DType(name)
        raise ConversionError(REFUSED.format(path=self._path, name=f"{module}.{name}"))

    def persistent_load(self, pid):
        """The `_Storage` a persistent id names.

        Raises:
            pickle.UnpicklingError: a persistent id in a pickle that has none.
        """
        if self._load_storage is None:
            raise pickle.UnpicklingError("a persistent id where none is expected")
        return self._load_storage(pid)


def _rebuild_tensor(storage, storage_offset, size, stride):
    """`torch._utils._rebuild_tensor` (PyTorch 0.3): a tensor of the storage's dtype."""
    return _tensor_ref(storage, storage_offset, size, stride, None, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """`torch._utils._rebuild_tensor_v2`: a tensor of the storage's dtype (`requires_grad`, hooks ignored)."""
    return _tensor_ref(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """`torch._utils._rebuild_tensor_v3`: a tensor of `dtype` over an untyped storage (uint16/32/64)."""
    if not isinstance(dtype, _DType):
        raise pickle.UnpicklingError("_rebuild_tensor_v3 without a torch dtype")
    return _tensor_ref(storage, storage_offset, size, stride, dtype.name, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """`torch._utils._rebuild_parameter(_with_state)`: the parameter is its tensor."""
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return data


def _device(*args):
    """`torch.device(type[, index])` as a string such as "cuda:0"."""
    if not args or len(args) > 2 or not isinstance(args[0], str):
        raise pickle.UnpicklingError("a torch.device without a type")
    return ":".join(str(arg) for arg in args)


def _encode(text, encoding="utf-8"):
    """`_codecs.encode`, which protocol-2 pickles use for bytes, limited to the latin-1, UTF-8 and ASCII codecs."""
    codec = encoding.lower().replace("-", "").replace("_", "") if isinstance(encoding, str) else None
    if not isinstance(text, str) or codec not in ("latin1", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r}")
    return text.encode(encoding)


# The globals a state dict pickle names -> what this reader calls instead (OrderedDict is a plain container).
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _Callable(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Callable(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Callable(_rebuild_parameter),
    ("torch", "device"): _Callable(_device),
    ("_codecs", "encode"): _Callable(_encode),
}


def _tensor_ref(storage, offset, size, stride, dtype, metadata):
    """Checks a tensor's arguments and returns its placeholder.

    Raises:
        pickle.UnpicklingError: arguments that are not a storage, a
            non-negative offset and matching size/stride tuples of
            non-negative ints.
    """
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage")
    size, stride = tuple(size), tuple(stride)
    numbers = (offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(n, int) and n >= 0 for n in numbers):
        raise pickle.UnpicklingError(f"a tensor with offset {offset!r}, size {size!r} and stride {stride!r}")
    return _TensorRef(storage, offset, size, stride, dtype or storage.dtype, metadata)


def _storage_type(storage_type):
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError(f"a storage of type {storage_type!r}")
    return storage_type.dtype


def _load_zip(path, handle):
    """The zip format: `<top>/data.pkl` with storages in `<top>/data/<key>`."""
    with zipfile.ZipFile(handle) as archive:
        names = set(archive.namelist())
        pickles = sorted(name for name in names if name.count("/") == 1 and name.endswith("/data.pkl"))
        if not pickles:
            raise ConversionError(
                f"{path} is not a PyTorch state dict file: a zip archive without the <folder>/data.pkl of torch.save."
            )
        top = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(top + "byteorder").decode("ascii") if top + "byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise ValueError(f"byteorder record {byteorder!r}")
        storages = {}

        def load_storage(pid):
            if not isinstance(pid, tuple) or len(pid) != 5 or _ascii(pid[0]) != "storage":
                raise pickle.UnpicklingError(f"persistent id {pid!r:.80}")
            dtype, key, numel = _storage_type(pid[1]), str(pid[2]), pid[4]
            if key not in storages:
                storages[key] = _read_zip_storage(archive, f"{top}data/{key}", key, dtype, numel, byteorder)
            return storages[key]

        result = _RestrictedUnpickler(io.BytesIO(archive.read(top + "data.pkl")), path, load_storage).load()
        return _materialize(result, {})


def _read_zip_storage(archive, name, key, dtype, numel, byteorder):
    """One storage record of a zip checkpoint, checked against the size its persistent id gives."""
    if not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"storage {key!r} with {numel!r} elements")
    nbytes = numel * np.dtype(TORCH_DTYPES[dtype]).itemsize
    if archive.getinfo(name).file_size < nbytes:
        raise ValueError(f"storage {key!r} holds fewer than its {nbytes} bytes")
    storage = _Storage(key, dtype, numel, byteorder)
    storage.set_bytes(np.frombuffer(archive.read(name)[:nbytes], np.uint8).copy())
    return storage


def _load_legacy(path, handle):
    """The legacy format: header pickles, the object, the storage keys, then each storage's bytes."""
    magic = _RestrictedUnpickler(handle, path).load()
    if magic != LEGACY_MAGIC_NUMBER:
        raise ValueError("no PyTorch magic number at the start")
    version = _RestrictedUnpickler(handle, path).load()
    if version != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"legacy protocol version {version!r}, not {LEGACY_PROTOCOL_VERSION}")
    _RestrictedUnpickler(handle, path).load()  # sys info: data are little-endian whatever it says, as for torch
    storages = {}

    def load_storage(pid):
        return _legacy_storage(pid, storages)

    result = _RestrictedUnpickler(handle, path, load_storage).load()
    keys = _RestrictedUnpickler(handle, path).load()
    if not isinstance(keys, list):
        raise TypeError("no storage key list after the object")
    for key in keys:
        _read_legacy_storage(handle, storages, str(key))
    return _materialize(result, {})


def _legacy_storage(pid, storages):
    """The `_Storage` of a legacy persistent id (a slice of its root for a view), created on first use."""
    if not isinstance(pid, tuple) or len(pid) != 6 or _ascii(pid[0]) != "storage":
        kind = _ascii(pid[0]) if isinstance(pid, tuple) and pid else pid
        raise pickle.UnpicklingError(f"persistent id {kind!r:.80}")
    dtype, key, numel, view = _storage_type(pid[1]), str(pid[2]), pid[4], pid[5]
    if not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"storage {key!r} with {numel!r} elements")
    root = storages.setdefault(key, _Storage(key, dtype, numel))
    if root.dtype != dtype:
        raise pickle.UnpicklingError(f"storage {key!r} saved as both {root.dtype} and {dtype}")
    if view is None:
        return root
    view_key, offset, view_numel = view
    if not all(isinstance(n, int) and n >= 0 for n in (offset, view_numel)):
        raise pickle.UnpicklingError(f"storage view {view!r:.80}")
    return storages.setdefault(str(view_key), _Storage(str(view_key), dtype, view_numel, "little", root, offset))


def _read_legacy_storage(handle, storages, key):
    """Reads one storage's int64 little-endian element count and bytes into `storages[key]`."""
    if key not in storages or storages[key].root is not None:
        raise ValueError(f"storage key {key!r} that the object does not use")
    storage = storages[key]
    (numel,) = struct.unpack("<q", handle.read(8))
    nbytes = numel * np.dtype(TORCH_DTYPES[storage.dtype]).itemsize
    left = os.fstat(handle.fileno()).st_size - handle.tell()
    if not 0 <= nbytes <= left:
        raise ValueError(f"storage {key!r} of {nbytes} bytes, with {left} left in the file (truncated?)")
    storage.set_bytes(np.frombuffer(handle.read(nbytes), np.uint8).copy())


def _materialize(obj, memo):
    """`obj` with every `_TensorRef` replaced by its NumPy array (containers are updated in place).

    Args:
        obj: the unpickled object.
        memo: `id -> result` of what is done, so a tensor saved twice is one
            array and a recursive container ends.

    Returns:
        The object with arrays for tensors.
    """
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _TensorRef):
        memo[id(obj)] = _array(obj)
    elif isinstance(obj, dict):
        memo[id(obj)] = obj
        for key, value in list(obj.items()):
            obj[key] = _materialize(value, memo)
        for key, value in list(getattr(obj, "__dict__", {}).items()):  # e.g. a state dict's _metadata
            obj.__dict__[key] = _materialize(value, memo)
    elif isinstance(obj, list):
        memo[id(obj)] = obj
        obj[:] = [_materialize(value, memo) for value in obj]
    elif isinstance(obj, tuple):
        memo[id(obj)] = tuple(_materialize(value, memo) for value in obj)
    elif isinstance(obj, _Sealed):  # a storage, storage type, dtype or rebuild function left as a value
        raise pickle.UnpicklingError(f"a bare {type(obj).__name__.lstrip('_')} where a tensor or value is expected")
    else:
        return obj
    return memo[id(obj)]


def _array(ref):
    """A tensor placeholder as a NumPy view of its storage (same shape, element strides and offset).

    Raises:
        ValueError: a shape/stride/offset that reaches past the storage.
    """
    storage = ref.storage.as_array(ref.dtype)
    if 0 in ref.size:
        return np.zeros(ref.size, storage.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= storage.size:
        raise ValueError(f"a tensor of shape {ref.size} reaches element {last} of a storage of {storage.size}")
    itemsize = storage.dtype.itemsize
    array = np.lib.stride_tricks.as_strided(
        storage[ref.offset:], shape=ref.size, strides=tuple(s * itemsize for s in ref.stride), writeable=True
    )
    if ref.conjugate:
        array = np.conj(array)
    if ref.negate:
        array = np.negative(array)
    return array


def _typed(raw, dtype, byteorder):
    """Raw bytes as a 1-D native array of torch dtype `dtype` (bfloat16 -> float32), swapping a big-endian file."""
    disk = np.dtype(TORCH_DTYPES[dtype])
    if byteorder == "big":
        disk = disk.newbyteorder(">")
    if raw.size % disk.itemsize:
        raise ValueError(f"{raw.size} bytes are not whole {dtype} elements")
    array = raw.view(disk)
    if dtype == "bfloat16":  # the high half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _ascii(value):
    return value.decode("ascii") if isinstance(value, bytes) else value


def _first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else "no message"


__all__ = ["load_torch_checkpoint"]
