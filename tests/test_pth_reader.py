"""Weight files read without PyTorch (``convert.pth``, bfloat16 safetensors), checked against torch.

torch writes the files and is the reference for their values; the reader itself never imports it
(the last test proves that in a subprocess where ``import torch`` fails). Hostile pickles are
refused before anything in them runs.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors.torch import save_file

from director_jax.convert.lazy import open_safetensors
from director_jax.convert.pth import load_pth
from director_jax.convert.state_dict import read_state_dict, safetensors_header

REPO = Path(__file__).resolve().parents[1]


def _ref(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _equal(got: np.ndarray, want: torch.Tensor) -> None:
    want_np = _ref(want)
    assert got.shape == want_np.shape and got.flags.c_contiguous
    if want.dtype == torch.bfloat16:
        assert got.dtype.name == "bfloat16"
        got = np.asarray(got, np.float32)
    assert got.dtype == want_np.dtype
    np.testing.assert_array_equal(got, want_np)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    shared = torch.randn(20, generator=g)
    return {
        "f32": base,
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).half(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(-5, 5),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": base.t(),
        "sliced": base[1:3, 2:5],  # a storage offset and a row stride
        "strided": shared[1::3],
        "shared_a": shared[:10].view(2, 5),  # two tensors on one storage
        "shared_b": shared[5:].view(3, 5).t(),
        "bf16_view": torch.randn(4, 4, generator=g).to(torch.bfloat16)[:, 1],
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
    }


def test_torch_save_values_and_views_match_torch(tmp_path):
    tensors = _tensors()
    path = tmp_path / "all.pth"
    torch.save(tensors, path)
    got = load_pth(path)
    assert set(got) == set(tensors)
    for key, want in tensors.items():
        _equal(got[key], want)
    # read_state_dict gives what torch.load + .float() for bfloat16 gives
    state = read_state_dict(path)
    assert state["bf16"].dtype == np.float32 and state["i64"].dtype == np.int64 and state["bool"].dtype == np.bool_
    for key, want in torch.load(path, weights_only=True).items():
        np.testing.assert_array_equal(state[key], _ref(want))


def test_module_state_dict_and_wrappers(tmp_path):
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Linear(4, 2))
    module[1].running_mean.uniform_()
    module.to(torch.bfloat16)
    sd = module.state_dict()
    assert isinstance(sd, OrderedDict)
    for name, obj in [("sd.pth", sd), ("wrapped.pt", {"state_dict": sd}), ("model.ckpt", {"model": dict(sd)})]:
        torch.save(obj, tmp_path / name)
        state = read_state_dict(tmp_path / name)
        assert list(state) == list(sd)
        for key, want in sd.items():
            np.testing.assert_array_equal(state[key], _ref(want))
    assert isinstance(load_pth(tmp_path / "sd.pth"), OrderedDict)


def _rewrite(src: Path, dst: Path, pkl=None, drop: str = "\0") -> None:
    """A copy of a torch.save zip with data.pkl replaced by ``pkl(old)`` and records containing ``drop`` left out."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            data = z.read(info)
            if info.filename.endswith("/data.pkl") and pkl is not None:
                data = pkl(data)
            if drop not in info.filename:
                out.writestr(info.filename, data)


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                         ("subprocess", "call")])
def test_hostile_pickle_is_refused_without_running(tmp_path, module, name):
    marker = tmp_path / "code-ran"
    arg = f"open({str(marker)!r}, 'w').close()" if name == "eval" else f"touch {marker}"
    if module == "subprocess":
        arg = ["touch", str(marker)]
    payload = f"c{module}\n{name}\n".encode() + pickle.dumps(arg, 2)[2:-1] + b"\x85R."
    pickle.loads(b"\x80\x02" + payload)  # the payload is live: a plain unpickle runs it
    assert marker.exists()
    marker.unlink()
    # hidden inside a real state dict, after a tensor
    good = tmp_path / "good.pth"
    torch.save({"a": torch.zeros(2), "b": "PLACEHOLDER"}, good)
    placeholder = b"X\x0b\x00\x00\x00PLACEHOLDER"
    for path, edit in [(tmp_path / "alone.pth", lambda _: b"\x80\x02" + payload),
                       (tmp_path / "inside.pth", lambda old: old.replace(placeholder, payload))]:
        _rewrite(good, path, edit)
        for read in (load_pth, read_state_dict):
            with pytest.raises(ValueError, match=rf"refusing to load .*{path.name}: .*{module}\.{name}.*safetensors"):
                read(path)
        assert not marker.exists()


def test_pickled_object_next_to_tensors_is_refused(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"w": torch.zeros(2), "opt": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*obj\.pth.*references"):
        read_state_dict(path)


def test_bad_files_are_one_line_value_errors_naming_them(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.randn(4)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    _rewrite(good, tmp_path / "nostorage.pth", drop="/data/")
    torch.save({"w": torch.zeros(4)}, tmp_path / "small.pth")  # a size that overruns its storage: refused, not read
    _rewrite(tmp_path / "small.pth", tmp_path / "overrun.pth", lambda old: old.replace(b"K\x04\x85", b"K\x7f\x85"))
    cases = {"cut.pth": "truncated or damaged", "legacy.pth": "pre-1.6", "junk.pth": "truncated or damaged",
             "nostorage.pth": "missing", "overrun.pth": "overruns"}
    for name, fragment in cases.items():
        with pytest.raises(ValueError) as err:
            read_state_dict(tmp_path / name)
        message = str(err.value)
        assert str(tmp_path / name) in message and fragment in message and "\n" not in message, message
        assert "is not a readable PyTorch file" in message, message


def test_bf16_safetensors_without_torch_match_torch(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(5, 7, generator=g).to(torch.bfloat16), "b": torch.randn(3, generator=g),
               "c": torch.randn(2, 3, 4, generator=g).to(torch.bfloat16), "d": torch.tensor(1.5).to(torch.bfloat16),
               "e": torch.zeros(0, 2, dtype=torch.bfloat16), "f": torch.arange(4).half()}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    state = read_state_dict(path)
    assert set(state) == set(tensors)
    for key, want in tensors.items():
        assert state[key].dtype == (np.float16 if key == "f" else np.float32)
        np.testing.assert_array_equal(state[key], _ref(want))
    lazy = open_safetensors(path)
    np.testing.assert_array_equal(lazy["a"].read((slice(1, 4), slice(2, 7))), _ref(tensors["a"][1:4, 2:7]))
    np.testing.assert_array_equal(lazy["c"].read((slice(None), slice(1, 3), slice(0, 4))), _ref(tensors["c"][:, 1:3]))
    np.testing.assert_array_equal(lazy["c"].read(), _ref(tensors["c"]))
    np.testing.assert_array_equal(lazy["d"].read(), _ref(tensors["d"]))
    np.testing.assert_array_equal(lazy["b"].read((slice(0, 2),)), _ref(tensors["b"][:2]))
    assert lazy["a"].read().dtype == np.float32
    # the reader used where safetensors' NumPy API refuses bfloat16 (older versions): same values
    monkeypatch.setattr(safetensors.numpy, "load_file", lambda _: (_ for _ in ()).throw(TypeError("bf16")))
    assert {k: (v.dtype, v.tolist()) for k, v in read_state_dict(path).items()} == \
        {k: (v.dtype, v.tolist()) for k, v in state.items()}


def _safetensors_blob(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize("blob", [
    _safetensors_blob({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 4),  # short data
    _safetensors_blob({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),  # size mismatch
    _safetensors_blob({"w": {"dtype": "BF16", "shape": [-4], "data_offsets": [0, 8]}}, b"\0" * 8),
    _safetensors_blob({"w": {"dtype": "F8_E9", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
    _safetensors_blob({"w": [1, 2]}, b""), _safetensors_blob([1], b""), (10**9).to_bytes(8, "little") + b"{}",
    b"\x05\0\0\0\0\0\0\0{abc}", b"\0\0"])
def test_malformed_safetensors_header_is_a_value_error(tmp_path, blob):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=r"bad\.safetensors is not a readable safetensors file \(.+\)\.$"):
        safetensors_header(path)


NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
from director_jax.convert.state_dict import read_state_dict, safetensors_header
from director_jax.convert.lazy import open_safetensors
pth, st = read_state_dict(sys.argv[1]), read_state_dict(sys.argv[2])
lazy = open_safetensors(sys.argv[2])["w"].read()
print(pth["w"].dtype, pth["w"].tolist(), st["w"].dtype, st["w"].tolist(), lazy.tolist())
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
"""


def test_reading_needs_no_torch(tmp_path):
    torch.save({"state_dict": {"w": torch.tensor([1.5, -2.0]).to(torch.bfloat16)}}, tmp_path / "w.pth")
    save_file({"w": torch.tensor([0.5, 3.0]).to(torch.bfloat16)}, str(tmp_path / "w.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["float32", "[1.5,", "-2.0]", "float32", "[0.5,", "3.0]", "[0.5,", "3.0]"]
