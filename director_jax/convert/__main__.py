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

``export --model pipeline --src GEN_RUN [--sr_src SR_RUN] --out DIR [--dtype bfloat16] [--step N]``
writes one diffusers-style pipeline directory (``model_index.json``, ``vae/``, ``transformer/``,
``scheduler/``, ``sr_transformer/``, ...) that ``director_jax.pytorch.SmartDirectorPipeline.from_pretrained``
loads: keyframes at times, captions, SR and the seed give the video the JAX ``generate`` gives.
"""

from __future__ import annotations

from absl import flags

from director_jax import cli
from director_jax.build import WEIGHTS, export_run, is_trainer_run
from director_jax.build.pipeline_export import export_pipeline
from director_jax.convert.command import DIRECTIONS, MODELS, convert_weights

_MODEL = flags.DEFINE_enum("model", None, [*sorted(MODELS), "pipeline"],
                           "Which model's weights (pipeline: Gen [+ SR] runs as one SmartDirectorPipeline directory).")
_SRC = flags.DEFINE_string("src", None, "The checkpoint to read (export: a directory written by import, or a "
                           "training run's workdir).")
_OUT = flags.DEFINE_string("out", None, "The directory to write.")
_CONFIG = flags.DEFINE_string("config", None, "config.json path or inline JSON object (for bare weight files).")
_ALLOW_NONFINITE = flags.DEFINE_bool("allow_nonfinite", False,
                                     "Convert weights holding NaN or infinite values (refused by default).")
_WEIGHTS = flags.DEFINE_enum("weights", "auto", list(WEIGHTS),
                             "A training run's weights: auto (the EMA where the run kept one), ema or params.")

_SR_SRC = flags.DEFINE_string("sr_src", None, "--model pipeline: the Director-SR training run to include.")
_STEP = flags.DEFINE_integer("step", None, "--model pipeline: the Gen run's step (default: the newest complete one).")
_SR_STEP = flags.DEFINE_integer("sr_step", None, "--model pipeline: the SR run's step (default: the newest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "--model pipeline: the weights' dtype.")
_TEXT_ENCODER = flags.DEFINE_string("text_encoder", None, "--model pipeline: a Wan diffusers release whose umT5 "
                                    "text_encoder/ and tokenizer/ the pipeline gets (text-conditioned models).")

USAGE = ("python -m director_jax.convert import|export --model vae|dit|sr|pipeline --src PATH --out DIR "
         "[--config JSON] "
         "[--allow_nonfinite] [--weights auto|ema|params]")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in DIRECTIONS:
        given = " ".join(argv[1:]) or "nothing"
        raise cli.UserError(f"give the direction first, import or export (got {given}): {USAGE}")
    for flag, value in (("--model", _MODEL.value), ("--src", _SRC.value), ("--out", _OUT.value)):
        if not value:
            raise cli.UserError(f"{flag} is required: {USAGE}")
    if _MODEL.value == "pipeline":
        if argv[1] != "export":
            raise cli.UserError("--model pipeline is written by export (from trainer runs), not import.")
        print(export_pipeline(_SRC.value, _OUT.value, sr_src=_SR_SRC.value, weights=_WEIGHTS.value,
                              dtype=_DTYPE.value, step=_STEP.value, sr_step=_SR_STEP.value,
                              text_encoder=_TEXT_ENCODER.value))
        return
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
