"""VAE weight conversion against diffusers: export, import from every source, the official layout; and the
``python -m director_jax.convert`` command (its function, its input checks, its one-line errors).

Real files in tmp_path; the official names are checked against diffusers' own Wan converter.
"""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from flax import nnx
from safetensors.numpy import save_file

from director_jax.convert import WeightMismatchError, export_vae, load_vae
from director_jax.convert.command import convert_weights
from director_jax.convert.sr import export_sr, load_sr
from director_jax.convert.vae_weights import official_key_map
from director_jax.errors import UserError
from director_jax.models.dit import WanDiT, WanDiTConfig
from director_jax.models.sr import DirectorSR
from director_jax.models.vae import WanVAE, WanVAEConfig
from tests.torch_reference import reference_decode, reference_encode, reference_vae, state_dict_numpy

REPO = Path(__file__).resolve().parents[1]

# tiny, with attention in an encoder stage so those keys are exported too
TINY = WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, attn_scales=(0.5,),
                    temperal_downsample=(True, True, False),
                    latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0))
# Wan2.1's block structure (dim_mult, num_res_blocks, temperal_downsample, z_dim), tiny width
OFFICIAL = WanVAEConfig(base_dim=4)

VIDEO = np.random.RandomState(0).uniform(-1, 1, (1, 5, 16, 16, 3)).astype(np.float32)  # 2 latent frames


@jax.jit(static_argnums=0)
def _encode(graphdef, state, video):
    return nnx.merge(graphdef, state).encode(video)


@jax.jit(static_argnums=0)
def _decode(graphdef, state, z):
    return nnx.merge(graphdef, state).decode(z)


def _reference_outputs(model):
    mean, logvar = reference_encode(model, VIDEO)
    decoded = reference_decode(model, mean)
    assert np.abs(decoded).max() > 0.1  # a real signal
    return mean, logvar, decoded


def _assert_same_outputs(vae, expected):
    """Encodes VIDEO and decodes the expected posterior mean; both within 1e-4 of ``expected``."""
    mean, logvar, decoded = expected
    graphdef, state = nnx.split(vae)
    got_mean, got_logvar = _encode(graphdef, state, jnp.asarray(VIDEO))
    np.testing.assert_allclose(got_mean, mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_logvar, logvar, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_decode(graphdef, state, jnp.asarray(mean)), decoded, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_ref():
    model = reference_vae(TINY, seed=1)
    return model, _reference_outputs(model)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A diffusers model, its state dict in the official Wan2.1 names, and that saved as a .pth."""
    model = reference_vae(OFFICIAL, seed=2)
    diffusers_sd = model.state_dict()
    names = official_key_map(nnx.eval_shape(lambda: WanVAE(OFFICIAL)))
    official_sd = {names[k]: v for k, v in diffusers_sd.items()}
    path = tmp_path_factory.mktemp("official") / "Wan2.1_VAE.pth"
    torch.save(official_sd, path)
    return model, diffusers_sd, official_sd, path


def test_export_loads_in_diffusers_with_same_outputs(tmp_path):
    source = state_dict_numpy(reference_vae(TINY, seed=5))
    vae = load_vae(source, TINY)
    out = export_vae(vae, tmp_path / "exported")
    model, info = AutoencoderKLWan.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert model.config["_class_name"] == "AutoencoderKLWan"
    assert WanVAEConfig.from_diffusers_config(dict(model.config)) == TINY
    # the file holds exactly the weights, and diffusers computes what this project computes
    exported = state_dict_numpy(model.eval())
    assert set(exported) == set(source)
    for key, value in source.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    _assert_same_outputs(vae, _reference_outputs(model))


def test_import_diffusers_directory_file_and_state_dict(tiny_ref, tmp_path):
    model, expected = tiny_ref
    model.save_pretrained(tmp_path / "model")
    model.save_pretrained(tmp_path / "pipeline" / "vae")  # a pipeline directory's vae/ subfolder
    sources = [tmp_path / "model", tmp_path / "model" / "diffusion_pytorch_model.safetensors",
               tmp_path / "pipeline", model.state_dict()]
    for src in sources:
        vae = load_vae(src, TINY if isinstance(src, dict) else None)
        assert vae.config == TINY
        _assert_same_outputs(vae, expected)


def test_bare_diffusers_weights_need_a_config(tiny_ref, tmp_path):
    model, _ = tiny_ref
    path = tmp_path / "weights.safetensors"
    save_file(state_dict_numpy(model), str(path))
    with pytest.raises(ValueError, match="no config"):
        load_vae(path)
    with pytest.raises(ValueError, match="carries no config"):
        load_vae(model.state_dict())
    with pytest.raises(ValueError, match=r"unknown VAE config keys \['base_dims'\]"):
        load_vae(path, {"base_dims": 8})
    (tmp_path / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    with pytest.raises(ValueError, match="not a AutoencoderKLWan"):
        load_vae(path)
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "absent.safetensors")
    assert load_vae(path, TINY.to_diffusers_config()).config == TINY


def test_official_names_are_diffusers_converters_and_load(official):
    model, diffusers_sd, official_sd, path = official
    assert len(official_sd) == len(diffusers_sd)
    # a few names of the released Wan2.1_VAE.pth, for the reader
    for name in ("encoder.conv1.weight", "encoder.downsamples.5.time_conv.weight", "encoder.middle.1.to_qkv.weight",
                 "encoder.head.2.weight", "conv1.weight", "conv2.weight", "decoder.upsamples.3.time_conv.weight",
                 "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.weight",
                 "decoder.upsamples.14.residual.6.bias", "decoder.head.0.gamma"):
        assert name in official_sd, name
    # independent check: diffusers' own converter maps our official names back to exactly its keys
    converted = convert_wan_vae_to_diffusers(official_sd)
    assert set(converted) == set(diffusers_sd)
    assert all(converted[k] is diffusers_sd[k] for k in diffusers_sd)

    vae = load_vae(path)  # the config is inferred from the shapes
    assert vae.config == OFFICIAL
    _assert_same_outputs(vae, _reference_outputs(model))


def test_convert_import_official_then_export(official, tmp_path):
    _, diffusers_sd, _, path = official
    line = convert_weights("import", "vae", path, tmp_path / "imported")
    n_params = sum(v.numel() for v in diffusers_sd.values())
    assert f"{n_params:,} parameters" in line and "official Wan2.1 layout" in line

    assert "diffusers layout" in convert_weights("export", "vae", tmp_path / "imported", tmp_path / "out")
    model, info = AutoencoderKLWan.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, diffusers_sd[key]), key


def test_convert_checks_inputs_before_reading(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not read")
    (tmp_path / "file").write_text("")
    cases = [(("import", "unet", weights, tmp_path / "o"), "--model 'unet' cannot be converted; supported: dit, sr, "
                                                            "vae"),
             (("import", "vae", tmp_path / "missing.pth", tmp_path / "o"), "missing.pth does not exist"),
             (("export", "vae", weights, tmp_path / "o"), "is not a directory (use `import` for weight files)"),
             (("import", "vae", weights, tmp_path / "file"), "is a file; give a directory"),
             (("import", "vae", weights, tmp_path / "o", "{not json"), "--config is not valid JSON"),
             (("import", "vae", weights, tmp_path / "o", "[1]"), "no such file"),
             (("import", "vae", weights, tmp_path / "o", "{}"), "is not a readable safetensors file")]
    for args, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            convert_weights(*args)
        assert not (tmp_path / "o").exists()


def test_convert_sr_transformer(tmp_path):
    """``--model sr``: an SR transformer (in = 2 * out channels) round-trips; a Gen transformer is refused."""
    cfg = WanDiTConfig(num_attention_heads=2, attention_head_dim=8, in_channels=8, out_channels=4, text_dim=8,
                       freq_dim=16, ffn_dim=16, num_layers=1)
    sr = DirectorSR(WanDiT(cfg, rngs=nnx.Rngs(0)))
    export_sr(sr, tmp_path / "sr")
    line = convert_weights("import", "sr", tmp_path / "sr", tmp_path / "ours")
    assert line.startswith("imported sr: ") and "diffusers layout" in line
    again = load_sr(tmp_path / "ours")
    for a, b in zip(jax.tree.leaves(nnx.state(sr, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    gen = WanDiT(dataclasses.replace(cfg, in_channels=4), rngs=nnx.Rngs(0))
    from director_jax.convert import export_transformer

    export_transformer(gen, tmp_path / "gen")
    with pytest.raises(UserError, match=r"in_channels 4 and out_channels 4: not an SR model"):
        convert_weights("export", "sr", tmp_path / "gen", tmp_path / "sr_out")
    assert not (tmp_path / "sr_out").exists()


def _convert_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "director_jax.convert", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_missing_flag_or_direction_is_one_line_error(tmp_path):
    for args, message in [(("import", "--model", "vae", "--out", str(tmp_path / "o")), "error: --src is required: "),
                          (("--model", "vae", "--src", str(tmp_path), "--out", str(tmp_path / "o")),
                           "error: give the direction first, import or export (got nothing): ")]:
        proc = _convert_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stdout == "" and not (tmp_path / "o").exists()


def test_mismatched_diffusers_file_lists_every_bad_key(tiny_ref, tmp_path):
    state = state_dict_numpy(tiny_ref[0])
    del state["decoder.conv_in.bias"]
    state["encoder.extra.weight"] = np.zeros(3, np.float32)
    state["encoder.conv_out.weight"] = state["encoder.conv_out.weight"][:, :-1]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightMismatchError) as err:
        load_vae(path, TINY)
    message = str(err.value)
    for name in ("decoder.conv_in.bias", "encoder.extra.weight", "encoder.conv_out.weight"):
        assert name in message, message


def test_mismatched_official_file_reports_official_names_in_api_and_cli(official, tmp_path):
    _, _, official_sd, _ = official
    state = dict(official_sd)
    del state["decoder.upsamples.4.shortcut.weight"]
    state["encoder.bogus.weight"] = torch.zeros(2)
    state["decoder.middle.1.proj.weight"] = state["decoder.middle.1.proj.weight"][:-1]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    bad = ("decoder.upsamples.4.shortcut.weight", "encoder.bogus.weight", "decoder.middle.1.proj.weight")

    with pytest.raises(WeightMismatchError) as err:
        load_vae(path)
    assert err.value.missing == [bad[0]] and err.value.unexpected == [bad[1]]
    assert [m[0] for m in err.value.mismatched] == [bad[2]]
    assert "up_blocks" not in str(err.value)  # not the diffusers names

    proc = _convert_cli("import", "--model", "vae", "--src", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: weights from .pth file ")
    for name in bad:
        assert name in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "out").exists()


def _touch(path):
    Path(path).touch()


class _Payload:
    """Unpickling this runs code (creates a marker file): what a hostile .pth would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


def test_pth_with_pickled_objects_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*weights_only=True"):
        load_vae(path, TINY)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a full unpickle would have run it
    assert marker.exists()
