"""The torch-free checkpoint reader (`keras_resnet.convert.torch_pickle`), against what torch itself loads.

tests/fixtures/torch_checkpoints/ holds files written by `torch.save` in both
formats (zip, legacy) and `expected.npz`, what `torch.load(weights_only=True)`
returned for them (`make_fixtures.py` there, run in a torch environment). These
tests need no torch; where torch imports, they also compare with it live.
The evil checkpoints' pickles call `os.system`/`eval`: the reader must refuse
them before anything runs, which the absence of the side-effect file shows.
"""

import io
import pickle
import sys
import tarfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from keras_resnet.convert.torch_pickle import (
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    load_torch_checkpoint,
)
from keras_resnet.convert.weight_files import read_state_dict
from keras_resnet_settings.errors import ConversionError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "torch_checkpoints"
FORMATS = ("zip", "legacy")
PWNED = "torch_pickle_pwned.txt"  # what the evil fixtures' os.system call would write
METADATA = {"": {"version": 1}, "conv1": {"version": 1}, "bn1": {"version": 2}, "fc": {"version": 1}}
TINY_KEYS = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
             "bn1.num_batches_tracked", "fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "expected.npz") as data:
        return {key: data[key] for key in data.files}


def expected_of(expected, group, legacy=False):
    """`{key: array}` of one group of expected.npz (the legacy state dict has no uint16: torch cannot read it)."""
    arrays = {key.split("/", 1)[1]: value for key, value in expected.items() if key.startswith(group + "/")}
    if legacy:
        arrays.pop("extra.uint16")
    return arrays


def assert_same_arrays(ours, reference):
    assert list(ours) == list(reference)
    for key, array in reference.items():
        assert isinstance(ours[key], np.ndarray), key
        assert ours[key].dtype == array.dtype and ours[key].shape == array.shape, key
        assert np.array_equal(ours[key], array), key


def one_line_error(excinfo, path):
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message, message
    return message


# --- hand-made pickles: what torch.save writes, opcode by opcode (no torch needed) ---------------------------


def _op(value):
    """`value` as pickle opcodes, without the PROTO header and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _tensor(key, numel, offset, size, stride, storage="FloatStorage"):
    """The opcodes of `_rebuild_tensor_v2(<storage key, numel>, offset, size, stride, False, OrderedDict())`."""
    pid = b"(" + _op("storage") + _global("torch", storage) + _op(key) + _op("cpu") + _op(numel) + b"tQ"
    hooks = _global("collections", "OrderedDict") + b")R"
    args = b"(" + pid + _op(offset) + _op(tuple(size)) + _op(tuple(stride)) + b"\x89" + hooks + b"t"
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _dict_pickle(items):
    """A protocol-2 pickle of a dict whose values are opcode fragments."""
    return b"\x80\x02}" + b"".join(_op(key) + value + b"s" for key, value in items.items()) + b"."


def write_zip(path, data_pkl, storages=None, byteorder=b"little", top="archive"):
    """A checkpoint in torch's zip layout: `<top>/data.pkl`, `<top>/data/<key>`, byteorder, version."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{top}/data.pkl", data_pkl)
        archive.writestr(f"{top}/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"{top}/data/{key}", data)
        archive.writestr(f"{top}/version", b"3\n")
    return path


def write_legacy(path, main_pickle, storages=None):
    """A checkpoint in the legacy layout: magic, protocol, sys info, `main_pickle`, keys, storages."""
    storages = storages or {}
    sys_info = {"protocol_version": LEGACY_PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(LEGACY_MAGIC_NUMBER, 2), pickle.dumps(LEGACY_PROTOCOL_VERSION, 2),
             pickle.dumps(sys_info, 2), main_pickle, pickle.dumps(sorted(storages), 2)]
    for key in sorted(storages):
        numel, data = storages[key]
        parts.append(np.int64(numel).astype("<i8").tobytes() + data)
    path.write_bytes(b"".join(parts))
    return path


class EvalPayload:
    """Pickles as `eval(...)` of code that would write a file."""

    def __reduce__(self):
        return eval, (f"open({PWNED!r}, 'w').write('pwned')",)


class UserClass:
    """A plain user object: unpickling it imports this module."""


# --- the fixtures, both formats --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dicts_are_what_torch_load_returns(fmt, expected):
    state = load_torch_checkpoint(FIXTURES / f"state_dict_{fmt}.pth")
    assert isinstance(state, OrderedDict) and state._metadata == METADATA  # torchvision's BUILD'ed attribute
    assert_same_arrays(state, expected_of(expected, "state_dict", legacy=fmt == "legacy"))
    assert list(state)[: len(TINY_KEYS)] == TINY_KEYS
    count = state["bn1.num_batches_tracked"]
    assert count.shape == () and count.dtype == np.int64 and int(count) == 7
    assert state["conv1.weight"].dtype == np.float32 and state["conv1.weight"].shape == (4, 3, 3, 3)
    assert state["extra.float16"].dtype == np.float16 and state["extra.bfloat16"].dtype == np.float32
    assert state["extra.scalar"].shape == () and float(state["extra.scalar"]) == 2.5
    assert state["extra.empty"].shape == (0, 3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_keep_their_strides_offset_and_shared_storage(fmt):
    state = load_torch_checkpoint(FIXTURES / f"state_dict_{fmt}.pth")
    base, transposed, part = state["extra.base"], state["extra.transposed"], state["extra.slice"]
    np.testing.assert_array_equal(base, np.arange(24, dtype=np.float32).reshape(4, 6))
    assert transposed.shape == (6, 4) and transposed.strides == (4, 24) and not transposed.flags.c_contiguous
    np.testing.assert_array_equal(transposed, base.T)
    assert part.shape == (2, 3) and part.strides == (24, 4)
    np.testing.assert_array_equal(part, base[1:3, 2:5])
    address = lambda array: array.__array_interface__["data"][0]
    assert address(part) - address(base) == 8 * 4  # storage offset 8 elements
    assert np.shares_memory(base, transposed) and np.shares_memory(base, part)
    assert state["extra.expanded"].strides == (0, 4)
    np.testing.assert_array_equal(state["extra.expanded"], [[1, -2]] * 3)


def test_a_big_endian_checkpoint_is_converted_to_native(expected):
    state = load_torch_checkpoint(FIXTURES / "bigendian_zip.pth")
    assert_same_arrays(state, expected_of(expected, "bigendian"))
    assert all(array.dtype.isnative for array in state.values())
    assert state["transposed"].strides == (4, 12)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrapped_checkpoints_keep_their_values_and_read_state_dict_unwraps_them(fmt, expected, monkeypatch):
    path = FIXTURES / f"wrapped_{fmt}.pth"
    checkpoint = load_torch_checkpoint(path)
    assert {key: value for key, value in checkpoint.items() if key != "state_dict"} == {
        "epoch": 3, "step": 1200, "best_acc1": 0.625, "arch": "tiny", "tag": b"\x00\xffbytes", "device": "cpu",
        "lrs": [0.1, 0.01], "shape": (3, 4)}
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` fails, as where torch is not installed
    state, name = read_state_dict(path)
    assert name == str(path) and list(state) == TINY_KEYS
    tiny = {key: expected[f"state_dict/{key}"] for key in TINY_KEYS}
    assert_same_arrays(state, tiny)


def test_read_state_dict_reads_both_formats_without_torch(expected, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    for fmt in FORMATS:
        state, _ = read_state_dict(FIXTURES / f"state_dict_{fmt}.pth")
        assert_same_arrays(state, expected_of(expected, "state_dict", legacy=fmt == "legacy"))


# --- refusing code -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_pickle_that_calls_os_system_is_refused_before_it_runs(fmt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the payload's `echo pwned > torch_pickle_pwned.txt` would write
    path = FIXTURES / f"evil_{fmt}.pth"
    with pytest.raises(ConversionError) as excinfo:
        load_torch_checkpoint(path)
    message = one_line_error(excinfo, path)
    assert "holds a pickled posix.system" in message and "can execute code" in message
    assert "state_dict()" in message and ".safetensors" in message
    with pytest.raises(ConversionError, match="posix.system"):
        read_state_dict(path)
    assert not (tmp_path / PWNED).exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (EvalPayload(), "__builtin__.eval"),  # protocol 2 writes Python 2 module names
        (__import__("argparse").Namespace(lr=0.1), "argparse.Namespace"),
        (np.zeros(2, np.float32), "multiarray._reconstruct"),
        (UserClass(), "UserClass"),
    ],
    ids=["eval", "namespace", "numpy", "user_class"],
)
def test_any_global_but_tensors_and_containers_is_refused(fmt, payload, refused, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = pickle.dumps({"conv1.weight": 1, "payload": payload}, protocol=2)
    path = tmp_path / f"evil.{fmt}.pth"
    write_zip(path, data) if fmt == "zip" else write_legacy(path, data)
    with pytest.raises(ConversionError) as excinfo:
        load_torch_checkpoint(path)
    message = one_line_error(excinfo, path)
    assert refused in message and "can execute code" in message
    assert not (tmp_path / PWNED).exists()


def test_build_cannot_retarget_a_tensor_past_its_storage(tmp_path):
    """A BUILD opcode on a tensor placeholder (setting its size after the checks) is refused."""
    storage = {"0": np.arange(4, dtype="<f4").tobytes()}
    build = b"N" + _op({"size": (1000,), "stride": (1,)}) + b"\x86b"  # (None, slotstate) BUILD
    path = write_zip(tmp_path / "build.pth", _dict_pickle({"w": _tensor("0", 4, 0, (4,), (1,)) + build}), storage)
    with pytest.raises(ConversionError) as excinfo:
        load_torch_checkpoint(path)
    assert "is not a PyTorch state dict file" in one_line_error(excinfo, path)


# --- corrupt and foreign files -----------------------------------------------------------------------------------


def test_hand_made_pickles_read_like_torch_saves(tmp_path):
    """The opcode helpers above make what the reader accepts (so the failures below test the checks)."""
    storage = {"0": np.arange(6, dtype="<f4").tobytes()}
    items = {"w": _tensor("0", 6, 1, (2, 2), (1, 2))}
    state = load_torch_checkpoint(write_zip(tmp_path / "ok.pth", _dict_pickle(items), storage))
    np.testing.assert_array_equal(state["w"], [[1, 3], [2, 4]])
    legacy_items = {"w": _tensor("0", 6, 1, (2, 2), (1, 2)).replace(b"\x06tQ", b"\x06NtQ")}  # + view_metadata
    state = load_torch_checkpoint(write_legacy(tmp_path / "ok_legacy.pth", _dict_pickle(legacy_items),
                                               {"0": (6, storage["0"])}))
    np.testing.assert_array_equal(state["w"], [[1, 3], [2, 4]])


@pytest.mark.parametrize(
    ("size", "stride", "offset"),
    [((3, 2), (3, 1), 0), ((2, 2), (1, 2), 3), ((7,), (1,), 0), ((2,), (-1,), 1), ((2,), (1,), -1)],
    ids=["rows", "offset", "numel", "negative_stride", "negative_offset"],
)
def test_a_tensor_reaching_past_its_storage_is_refused(size, stride, offset, tmp_path):
    storage = {"0": np.arange(6, dtype="<f4").tobytes()}
    path = write_zip(tmp_path / "oob.pth", _dict_pickle({"w": _tensor("0", 6, offset, size, stride)}), storage)
    with pytest.raises(ConversionError) as excinfo:
        load_torch_checkpoint(path)
    assert "is not a PyTorch state dict file" in one_line_error(excinfo, path)


def _truncated(name, keep):
    def make(tmp_path):
        data = (FIXTURES / name).read_bytes()
        path = tmp_path / name
        path.write_bytes(data[: keep(len(data))])
        return path

    return make


def _short_storage(tmp_path):
    storage = {"0": np.arange(3, dtype="<f4").tobytes()}  # 3 of the 6 elements the pickle names
    return write_zip(tmp_path / "short.pth", _dict_pickle({"w": _tensor("0", 6, 0, (6,), (1,))}), storage)


def _no_data_pkl(tmp_path):
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.weights.h5", b"")
    return path


def _wrong_magic(tmp_path):
    path = tmp_path / "numbers.pt"
    path.write_bytes(pickle.dumps(12345, 2) + pickle.dumps([1, 2], 2))
    return path


def _text(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_text("hello, not a checkpoint")
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "make",
    [
        _truncated("state_dict_zip.pth", lambda n: n // 2),
        _truncated("state_dict_legacy.pth", lambda n: n - 10),
        _truncated("state_dict_legacy.pth", lambda n: n // 3),
        _short_storage,
        _no_data_pkl,
        _wrong_magic,
        _text,
        _empty,
    ],
    ids=["zip_half", "legacy_last_bytes", "legacy_third", "short_storage", "zip_without_data_pkl", "wrong_magic",
         "text", "empty"],
)
def test_corrupt_or_foreign_files_are_one_line_errors(make, tmp_path):
    path = make(tmp_path)
    with pytest.raises(ConversionError) as excinfo:
        load_torch_checkpoint(path)
    assert "is not a PyTorch state dict file" in one_line_error(excinfo, path)
    with pytest.raises(ConversionError, match="is not a PyTorch state dict file"):
        read_state_dict(path)


def test_a_torch_0_3_tar_checkpoint_is_refused_in_one_line(tmp_path):
    path = tmp_path / "old.pth"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("pickle")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ConversionError) as excinfo:
        load_torch_checkpoint(path)
    assert "PyTorch 0.1-0.3 tar checkpoint" in one_line_error(excinfo, path)


# --- live, where torch imports ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_live_against_torch_load(fmt, tmp_path):
    torch = pytest.importorskip("torch")

    def numpy_of(tensor):
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()

    for name in (f"state_dict_{fmt}.pth", f"wrapped_{fmt}.pth"):
        reference = torch.load(FIXTURES / name, weights_only=True)
        reference = reference.get("state_dict", reference)
        ours = load_torch_checkpoint(FIXTURES / name)
        assert_same_arrays(ours.get("state_dict", ours), {k: numpy_of(v) for k, v in reference.items()})
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(5, 2))
    path = tmp_path / "fresh.pth"
    torch.save(module.state_dict(), path, _use_new_zipfile_serialization=fmt == "zip")
    ours = load_torch_checkpoint(path)
    assert ours._metadata == module.state_dict()._metadata
    assert_same_arrays(ours, {key: value.numpy() for key, value in module.state_dict().items()})
