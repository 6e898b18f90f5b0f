"""Bad weight files for ``convert`` (issue 18): refused in one line, nothing written.

Real files written with safetensors and ``torch.save``: NaN / inf weights (refused unless
``--allow_nonfinite``), integer and boolean tensors, truncated ``.pth`` (zip and legacy formats),
malformed and truncated safetensors, sharded indexes whose shard names leave the model directory.
The fast tests call ``convert_weights``; the probe table runs the same cases through
``python -m director_jax.convert`` (subprocesses, ``-m slow``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from director_jax.convert import export_vae, load_vae
from director_jax.convert.command import convert_weights
from director_jax.errors import UserError
from director_jax.models.vae import WanVAE, WanVAEConfig

REPO = Path(__file__).resolve().parents[1]
TINY = WanVAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, attn_scales=(),
                    temperal_downsample=(True,), latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A real exported VAE directory (config.json + safetensors)."""
    return export_vae(WanVAE(TINY, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("vae") / "model")


def _state(model_dir: Path) -> dict[str, np.ndarray]:
    return dict(load_file(str(model_dir / "diffusion_pytorch_model.safetensors")))


def _model_copy(model_dir: Path, dst: Path, state: dict[str, np.ndarray] | None = None) -> Path:
    dst.mkdir(parents=True)
    (dst / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    save_file(state if state is not None else _state(model_dir), str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def make_cases(model_dir: Path, root: Path) -> list[tuple[str, list[str], str]]:
    """(name, convert arguments after ``import --model vae``, expected message fragment), files made under root."""
    root.mkdir(parents=True, exist_ok=True)
    state = _state(model_dir)
    first = sorted(state)[0]
    cases = []

    def with_value(name, key, edit):
        s = {k: v.copy() for k, v in state.items()}
        s[key] = edit(s[key])
        return _model_copy(model_dir, root / name, s)

    nan = with_value("nan", sorted(state)[3], lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a))
    cases.append(("NaN weight", ["--src", str(nan)], f"hold non-finite values: '{sorted(state)[3]}' has 1 NaN and 0 "
                                                     "infinite"))
    inf = with_value("inf", first, lambda a: np.full_like(a, np.inf))
    cases.append(("inf weight", ["--src", str(inf)], f"'{first}' has 0 NaN and {state[first].size} infinite"))
    pth = root / "nan.pth"
    torch.save({k: torch.from_numpy(v) for k, v in {**state, first: np.full_like(state[first], -np.inf)}.items()}, pth)
    cases.append(("inf in a .pth", ["--src", str(pth), "--config", str(model_dir / "config.json")],
                  "hold non-finite values"))
    ints = with_value("int", first, lambda a: a.astype(np.int64))
    cases.append(("int64 weight", ["--src", str(ints)], f"'{first}' has dtype int64"))
    bools = with_value("bool", first, lambda a: a > 0)
    cases.append(("bool weight", ["--src", str(bools)], f"'{first}' has dtype bool"))
    int_pth = root / "int.pth"
    torch.save({first: torch.zeros(3, dtype=torch.int32)}, int_pth)
    cases.append(("int32 in a .pth", ["--src", str(int_pth)], f"'{first}' has dtype int32"))
    nested = root / "nested.pth"
    torch.save({first: {"inner": torch.zeros(2)}}, nested)
    cases.append((".pth holding a dict, not a tensor", ["--src", str(nested)], "is not a tensor"))

    full = root / "full.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, full)
    data = full.read_bytes()
    (root / "truncated.pth").write_bytes(data[: len(data) // 2])
    cases.append(("truncated .pth (zip)", ["--src", str(root / "truncated.pth")], "is not a readable PyTorch file"))
    legacy = root / "legacy.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    (root / "legacy_cut.pth").write_bytes(data[: len(data) // 2])
    cases.append(("truncated legacy .pth", ["--src", str(root / "legacy_cut.pth")], "is not a readable PyTorch file"))
    (root / "head.pth").write_bytes(data[:30])
    cases.append(("legacy .pth cut in its header", ["--src", str(root / "head.pth")], "is not a readable PyTorch file"))

    st = (model_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    for name, blob in [("truncated", st[: len(st) // 2]), ("zero", b""), ("header", st[:20]),
                       ("badjson", (5).to_bytes(8, "little") + b"{abc}"), ("huge", (10**15).to_bytes(8, "little"))]:
        (root / f"{name}.safetensors").write_bytes(blob)
        cases.append((f"{name} safetensors", ["--src", str(root / f"{name}.safetensors"), "--config",
                                              str(model_dir / "config.json")], "is not a readable safetensors file"))

    for name, shard in [("dotdot", "../model/diffusion_pytorch_model.safetensors"),
                        ("absolute", str(model_dir / "diffusion_pytorch_model.safetensors"))]:
        d = root / f"index_{name}"
        d.mkdir()
        (d / "config.json").write_bytes((model_dir / "config.json").read_bytes())
        index = {"metadata": {}, "weight_map": dict.fromkeys(state, shard)}
        (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        cases.append((f"index shard {name}", ["--src", str(d)], "which is not a file inside"))
    d = root / "index_nomap"
    d.mkdir()
    (d / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}}')
    cases.append(("index without weight_map", ["--src", str(d)], "needs a non-empty \"weight_map\""))
    d = root / "index_junk"
    d.mkdir()
    (d / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    cases.append(("index not JSON", ["--src", str(d)], "is not a valid JSON index"))
    d = root / "index_missing_shard"
    d.mkdir()
    (d / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(state, "shard-1.safetensors")}))
    cases.append(("index shard missing", ["--src", str(d)], "but " + str(d / "shard-1.safetensors") + " is missing"))
    d = _model_copy(model_dir, root / "badconfig")
    (d / "config.json").write_text("{oops")
    cases.append(("config.json not JSON", ["--src", str(d)], "config.json is not valid JSON"))
    return cases


def _args(argv: list[str]) -> tuple[str, str | None]:
    src = argv[argv.index("--src") + 1]
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    return src, config


def test_bad_weight_files_are_refused_in_one_line_and_nothing_is_written(model_dir, tmp_path):
    cases = make_cases(model_dir, tmp_path / "files")
    assert len(cases) >= 10
    for name, argv, fragment in cases:
        src, config = _args(argv)
        out = tmp_path / "out"
        with pytest.raises(UserError) as err:
            convert_weights("import", "vae", src, out, config)
        message = str(err.value)
        assert fragment in message, (name, message)
        assert "\n" not in message, (name, message)
        assert not out.exists(), name


def test_nan_weights_pass_only_when_allowed(model_dir, tmp_path):
    state = _state(model_dir)
    key = sorted(state)[0]
    state[key] = np.full_like(state[key], np.nan)
    bad = _model_copy(model_dir, tmp_path / "nan", state)
    with pytest.raises(ValueError, match=f"'{key}' has {state[key].size} NaN"):
        load_vae(bad)
    with pytest.raises(ValueError, match="non-finite"):
        load_vae(state, TINY)  # an in-memory state dict too
    line = convert_weights("import", "vae", bad, tmp_path / "out", allow_nonfinite=True)
    assert line.startswith("imported vae: ")
    assert np.isnan(_state(tmp_path / "out")[key]).all()
    vae = load_vae(bad, allow_nonfinite=True)
    assert vae.config == TINY


def test_index_confined_to_its_directory_but_symlinked_shards_load(model_dir, tmp_path):
    """Shard names are checked as written (no '..', not absolute); a shard that is a symlink (HF cache) loads."""
    d = tmp_path / "linked"
    d.mkdir()
    (d / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    os.symlink(model_dir / "diffusion_pytorch_model.safetensors", d / "shard-00001.safetensors")
    state = _state(model_dir)
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(state, "shard-00001.safetensors")}))
    assert load_vae(d).config == TINY


def _convert_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "director_jax.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_probe_table_through_the_command(model_dir, tmp_path):
    cases = make_cases(model_dir, tmp_path / "files")
    failures = []
    for name, argv, fragment in cases:
        out = tmp_path / "out"
        proc = _convert_cli("import", "--model", "vae", *argv, "--out", str(out))
        lines = proc.stderr.strip().splitlines()
        if not (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
                and "Traceback" not in proc.stderr and proc.stdout == "" and not out.exists()):
            failures.append((name, proc.returncode, proc.stderr[-500:]))
    assert not failures, failures
    src = next(argv for name, argv, _ in cases if name == "NaN weight")
    proc = _convert_cli("import", "--model", "vae", *src, "--out", str(tmp_path / "allowed"), "--allow_nonfinite")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "allowed" / "diffusion_pytorch_model.safetensors").is_file()
