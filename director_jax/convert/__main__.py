"""``python -m director_jax.convert``: weights into this project's format, or out of it for diffusers / PyTorch.

    python -m director_jax.convert import --model vae --src Wan2.1_VAE.pth --out weights/vae
    python -m director_jax.convert import --model dit --src Wan2.1-T2V-1.3B --out weights/dit
    python -m director_jax.convert export --model sr --src weights/sr --out export/sr [--config JSON]
    python -m director_jax.convert export --model vae --src runs/vae_tiny --out export/vae [--weights params]

The first argument is the direction: ``import`` reads any supported checkpoint (a diffusers
directory, a .safetensors or .pth file in the diffusers or official Wan2.1 layout), checks every key
against the model and writes this project's format, a diffusers-layout directory; ``export``
re-writes such a directory for diffusers / PyTorch users. ``--model``: ``vae`` (Wan2.1 VAE), ``dit``
(the Wan2.1 T2V transformer, Director-Gen) or ``sr`` (Director-SR). ``--config``: a config.json path
or an inline JSON object with diffusers' keys, for files that carry no config. Bad input (a missing
file, weights that do not fit the model, a truncated or malformed weight file, an index whose shard
names leave its directory, integer or boolean tensors, NaN / infinite weights without
``--allow_nonfinite``) is ``error: ...`` and exit code 2, before anything is written.

``--src`` may also be a training run of this project (``python -m director_jax.train``'s workdir, its
checkpoints/ directory or one step directory): its newest complete step is written as a diffusers
directory, the EMA weights where the run kept them (``--weights auto``, or ``ema`` / ``params``).
``--model`` must be the run's task (``vae`` for a VAE run, ``dit`` for Director-Gen, ``sr`` for
Director-SR); a VAE's config.json records the latent statistics the run measured.
"""

from __future__ import annotations

from absl import flags

from director_jax import cli
from director_jax.build import WEIGHTS, export_run, is_trainer_run
from director_jax.convert.command import DIRECTIONS, MODELS, convert_weights

_MODEL = flags.DEFINE_enum("model", None, sorted(MODELS), "Which model's weights.")
_SRC = flags.DEFINE_string("src", None, "The checkpoint to read (export: a directory written by import, or a "
                           "training run's workdir).")
_OUT = flags.DEFINE_string("out", None, "The directory to write.")
_CONFIG = flags.DEFINE_string("config", None, "config.json path or inline JSON object (for bare weight files).")
_ALLOW_NONFINITE = flags.DEFINE_bool("allow_nonfinite", False,
                                     "Convert weights holding NaN or infinite values (refused by default).")
_WEIGHTS = flags.DEFINE_enum("weights", "auto", list(WEIGHTS),
                             "A training run's weights: auto (the EMA where the run kept one), ema or params.")

USAGE = ("python -m director_jax.convert import|export --model vae|dit|sr --src PATH --out DIR [--config JSON] "
         "[--allow_nonfinite] [--weights auto|ema|params]")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in DIRECTIONS:
        given = " ".join(argv[1:]) or "nothing"
        raise cli.UserError(f"give the direction first, import or export (got {given}): {USAGE}")
    for flag, value in (("--model", _MODEL.value), ("--src", _SRC.value), ("--out", _OUT.value)):
        if not value:
            raise cli.UserError(f"{flag} is required: {USAGE}")
    if is_trainer_run(_SRC.value):
        print(export_run(argv[1], _MODEL.value, _SRC.value, _OUT.value, _CONFIG.value, weights=_WEIGHTS.value))
        return
    if _WEIGHTS.value != "auto":
        raise cli.UserError(f"--weights {_WEIGHTS.value} chooses among a training run's weights; {_SRC.value} is not "
                            "a training run (a workdir of python -m director_jax.train).")
    print(convert_weights(argv[1], _MODEL.value, _SRC.value, _OUT.value, _CONFIG.value,
                          allow_nonfinite=_ALLOW_NONFINITE.value))


if __name__ == "__main__":
    cli.run(main)
