"""``generate`` with the models sharded over 8 CPU devices (``--mesh``) against one device, and in bfloat16.

The weights are read from the trainer's checkpoint straight into their shards (``build.load_director_gen``
with a mesh: the config's axis rules, as in training); the video must not depend on where it ran.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from director_jax.build import load_director_gen
from director_jax.configs_common import load_config
from director_jax.errors import GenerateError
from director_jax.parallel.mesh import inference_mesh
from tests.test_generate import GEN_CONFIG, _keyframe_args, _run, checkpoint, images  # noqa: F401 -- fixtures


@pytest.fixture(scope="module")
def one_device(checkpoint, images, tmp_path_factory) -> dict:  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "single.mp4"
    return _run(f"--ckpt={checkpoint}", *_keyframe_args(images), "--frames=17", "--steps=2", "--seed=3",
                "--mesh=single", f"--out={out}")


@pytest.mark.parametrize("mesh", ["fsdp=4,tensor=2", "fsdp=4,sequence=2"])
def test_a_sharded_model_gives_the_one_device_video(one_device, checkpoint, images, tmp_path, mesh):  # noqa: F811
    out = tmp_path / "sharded.mp4"
    sharded = _run(f"--ckpt={checkpoint}", *_keyframe_args(images), "--frames=17", "--steps=2", "--seed=3",
                   f"--mesh={mesh}", f"--out={out}")
    np.testing.assert_allclose(sharded["frames"], one_device["frames"], atol=1e-5)
    placement = json.loads(out.with_suffix(".json").read_text())["placement"]
    assert placement["devices"] == 8 and placement["dtype"] == "float32"
    assert placement["mesh"] == {k: int(v) for k, v in (kv.split("=") for kv in mesh.split(","))}


def test_weights_are_read_into_their_shards(checkpoint):  # noqa: F811
    """On a mesh each weight lands sharded by the config's rules, in the asked dtype (the norms, modulation tables
    and time embedding in float32, models/dit.py:FLOAT32_PARAMS), never whole on one device."""
    cfg = load_config(GEN_CONFIG)
    mesh = inference_mesh("fsdp=4,tensor=2")
    gen, loaded = load_director_gen(cfg, checkpoint, sharding=mesh, dtype="bfloat16")
    specs = {}
    for path, value in nnx.to_flat_state(nnx.state(gen, nnx.Param)):
        array, name = value.get_value(), "/".join(map(str, path))
        kept = any(key in name for key in ("scale_shift_table", "time_embedder", "time_proj", "norm2", "norm_q",
                                           "norm_k"))
        assert array.dtype == (jnp.float32 if kept else jnp.bfloat16), name
        assert array.sharding.mesh == mesh
        specs[name] = array.sharding.spec
    sharded = [name for name, spec in specs.items() if any(axis is not None for axis in spec)]
    assert len(sharded) > len(specs) // 2, specs  # the big matrices: fsdp on "embed", tensor on "heads" / "mlp"
    assert loaded.weights == "ema"


def test_bfloat16_weights_stay_close(one_device, checkpoint, images, tmp_path):  # noqa: F811
    """bfloat16 weights and compute: the video within 0.05 (of [-1, 1]) of float32's."""
    out = tmp_path / "bf16.mp4"
    bf16 = _run(f"--ckpt={checkpoint}", *_keyframe_args(images), "--frames=17", "--steps=2", "--seed=3",
                "--mesh=fsdp=4,tensor=2", "--dtype=bfloat16", f"--out={out}")
    diff = np.abs(bf16["frames"] - one_device["frames"])
    assert diff.max() < 0.05, diff.max()
    assert json.loads(out.with_suffix(".json").read_text())["placement"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("spec, message", [("fsdp=16", "needs 16 devices; there are 8"),
                                           ("fsdp=2,model=4", "write auto, single, or sizes"),
                                           ("fsdp", "write auto, single, or sizes")])
def test_a_bad_mesh_is_refused_before_loading(checkpoint, images, tmp_path, spec, message):  # noqa: F811
    out = tmp_path / "bad.mp4"
    with pytest.raises(GenerateError, match=message):
        _run(f"--ckpt={checkpoint}", *_keyframe_args(images), "--frames=17", f"--mesh={spec}", f"--out={out}")
    assert not list(tmp_path.iterdir())


def test_auto_mesh_is_one_device_on_a_cpu():
    assert inference_mesh("auto") is None and inference_mesh("single") is None
    assert dict(inference_mesh("fsdp=-1,tensor=2").shape) == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}


def test_weights_from_a_diffusers_directory_or_the_official_layout(one_device, checkpoint, images, tmp_path):  # noqa: F811
    """--ckpt may be weights with --config: the run's export (diffusers) and the same tensors under the official Wan
    names (a release root) give the trainer checkpoint's video, on one device and read into shards."""
    from safetensors.numpy import load_file, save_file

    from director_jax.build import export_run
    from director_jax.convert.dit import load_transformer
    from director_jax.convert.dit_weights import official_key_map

    diffusers_dir = tmp_path / "dit"
    export_run("export", "dit", str(checkpoint), str(diffusers_dir))
    state = load_file(str(diffusers_dir / "diffusion_pytorch_model.safetensors"))
    names = official_key_map(load_transformer(str(diffusers_dir)))
    release = tmp_path / "official"  # an official Wan release root: its config.json names the heads
    release.mkdir()
    save_file({names[k]: v for k, v in state.items()}, str(release / "diffusion_pytorch_model.safetensors"))
    (release / "config.json").write_text(json.dumps({"model_type": "t2v", "num_heads": 2, "eps": 1e-6}))
    args = [*_keyframe_args(images), "--frames=17", "--steps=2", "--seed=3"]
    from_dir = _run(f"--ckpt={diffusers_dir}", *args, "--mesh=single", f"--out={tmp_path / 'a.mp4'}")
    np.testing.assert_allclose(from_dir["frames"], one_device["frames"], atol=1e-5)
    assert json.loads((tmp_path / "a.json").read_text())["checkpoint"]["weights"] == "weights"
    official = _run(f"--ckpt={release}", *args, "--mesh=fsdp=4,tensor=2",
                    f"--out={tmp_path / 'b.mp4'}")
    np.testing.assert_allclose(official["frames"], one_device["frames"], atol=1e-5)


def test_weights_of_another_size_are_refused(checkpoint, images, tmp_path):  # noqa: F811
    from director_jax.build import export_run

    export_run("export", "dit", str(checkpoint), str(tmp_path / "dit"))
    wide = tmp_path / "wide.py"
    wide.write_text(f"""from director_jax.configs_common import load_config


def get_config():
    c = load_config({str(GEN_CONFIG)!r})
    c.model.ffn_dim = 256
    return c
""")
    with pytest.raises(GenerateError, match=r"--ckpt: .*holds a transformer with config .*ffn_dim=128"):
        _run(f"--ckpt={tmp_path / 'dit'}", f"--config={wide}", *_keyframe_args(images), "--frames=17",
             f"--out={tmp_path / 'out' / 'x.mp4'}")
    with pytest.raises(GenerateError, match="weight source .*pass --config"):
        cli_request(f"--ckpt={tmp_path / 'dit'}", f"--out={tmp_path / 'out' / 'y.mp4'}")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def cli_request(*args: str):
    """The request the CLI builds without --config (the run's recorded one)."""
    from absl import flags

    from director_jax import generate as cli

    cli.define_flags()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["director_jax.generate", "--noprogress", *args])
    return cli.request_from_flags()
