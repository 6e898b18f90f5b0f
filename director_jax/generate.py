"""``python -m director_jax.generate``: a video from keyframes (and conditioning videos) with a Director-Gen checkpoint.

    python -m director_jax.generate --ckpt runs/gen \\
        --keyframe first.png@0 --keyframe mid.png@1s --keyframe last.png@#16 --frames 17 --seed 0 --out out.mp4

The model config is the one the run recorded in its checkpoint (``--config FILE`` to give another).

Every mode is a timeline of given frames: ``--keyframe PATH@TIME`` (repeated; TIME in seconds, ``1.5``
or ``1.5s``, or a frame ``#12``, in increasing order) puts keyframes anywhere, and the keyframe
times set the pacing (the same keyframes further apart: slower). ``--video PATH@START`` gives a
conditioning video segment (START as TIME, or ``end``): at the start, the video is extended
forward; at the end, backward; two videos, in between. ``--shot_caption`` (repeated) builds the
shot-structured caption of multi-shot videos (``--caption``: one caption as it is), embedded by the
umT5 encoder in JAX (``--text_encoder``: a Wan diffusers or official release; no PyTorch needed) or read
from a text-embedding cache (``--text_cache``); models trained without captions
(``text.conditioning=False``) ignore them, with a note. ``--keyframe_guidance S``
(default the config's ``sampler.keyframe_guidance``; 1 = off) pushes the generated frames toward
what the keyframes imply, for models trained with keyframe dropout (two model calls per step).

``--mesh`` shards the models over devices as the trainer does (``auto``: every local TPU / GPU chip on
``fsdp``, so a 14B model's weights fit; ``fsdp=2,tensor=4``, with ``sequence=N`` for sequence-parallel
attention: with classifier-free guidance ``fsdp=2,sequence=2`` on a v5p-8 does a third of the work per
chip of ``fsdp=4``, see benchmarks/RESULTS.md); the weights are read from the checkpoint (or a diffusers
directory / Wan release with ``--config``) straight into their shards, in ``--dtype``.

Writes ``OUT.mp4``, ``OUT.png`` (contact sheet, keyframes outlined) and ``OUT.json`` (every setting, and the
SHA-256 of the other two) as one unit: staged beside OUT and moved into place, OUT.json last, under the lock
``OUT.lock`` (a second run to the same ``--out`` is refused while one runs). Every input is checked before the
model is loaded (the output location, every number finite and in range, the memory budget ``--max_pixels``,
the checkpoints, the images); a bad one is one line ``error: ...`` (exit code 2) and nothing is written. The
library behind it is ``director_jax.pipeline.generate``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from director_jax import cli
from director_jax.errors import GenerateError
from director_jax.pipeline.generate import generate
from director_jax.pipeline.request import DEFAULT_MAX_PIXELS, Request, run_config

_FLAGS: dict | None = None


def define_flags() -> dict:
    """Defines the command's flags (once) and returns them by name.

    Defined on demand, not at import, so programs that import this module with flags of their own
    (the CPU demo, tests) do not clash with it.
    """
    global _FLAGS
    if _FLAGS is None:
        d = flags
        _FLAGS = dict(
            config=config_flags.DEFINE_config_file("config", None, "Model config (default: the run's own)."),
            ckpt=d.DEFINE_string("ckpt", None, "Director-Gen checkpoint: a trainer workdir, checkpoints/ or step dir; "
                                 "or weights (a diffusers transformer directory, a Wan release, a .safetensors "
                                 "file) with --config."),
            step=d.DEFINE_integer("step", None, "Checkpoint step (default: the newest)."),
            weights=d.DEFINE_enum("weights", "auto", ["auto", "ema", "params"], "Which weights (auto: EMA when kept)."),
            keyframe=d.DEFINE_multi_string("keyframe", [], "PATH@TIME, TIME in seconds (1.5, 1.5s) or #frame."),
            video=d.DEFINE_multi_string("video", [], "PATH@START, repeated: conditioning video (START: time or end)."),
            duration=d.DEFINE_float("duration", None, "Video length in seconds (or --frames; default the config's)."),
            frames=d.DEFINE_integer("frames", None, "Video length in frames."),
            fps=d.DEFINE_float("fps", None, "Frames per second (default the config's video.fps)."),
            height=d.DEFINE_integer("height", None, "Height in pixels (default the config's)."),
            width=d.DEFINE_integer("width", None, "Width in pixels (default the config's)."),
            resize=d.DEFINE_bool("resize", False, "Resize keyframes / videos of another size (bicubic), not refuse."),
            caption=d.DEFINE_string("caption", None, "The caption, as it is."),
            shot_caption=d.DEFINE_multi_string("shot_caption", [], "One caption per shot, repeated (multi-shot)."),
            text_encoder=d.DEFINE_string("text_encoder", None,
                                         "umT5 text encoder to embed the caption with (text-conditioned models): a "
                                         "Wan diffusers pipeline root, a UMT5EncoderModel directory or an official "
                                         "Wan release root / models_t5_*.pth. Runs in JAX."),
            tokenizer=d.DEFINE_string("tokenizer", None,
                                      "The encoder's tokenizer directory (tokenizer.json), if not beside it."),
            text_dtype=d.DEFINE_enum("text_dtype", "bfloat16", ["bfloat16", "float32"], "Text encoder precision."),
            text_cache=d.DEFINE_string("text_cache", None,
                                       "Text-embedding cache holding the caption (instead of --text_encoder)."),
            seed=d.DEFINE_integer("seed", 0, "Noise seed: the same seed gives the same video."),
            steps=d.DEFINE_integer("steps", None, "Sampler steps (default the config's sampler.steps)."),
            guidance=d.DEFINE_float("guidance", None, "Classifier-free guidance scale (default the config's)."),
            keyframe_guidance=d.DEFINE_float("keyframe_guidance", None,
                                             "Keyframe guidance scale, 1 = off (default the config's "
                                             "sampler.keyframe_guidance); needs a model trained with keyframe "
                                             "dropout."),
            shift=d.DEFINE_float("shift", None, "Sampler timestep shift (default the config's)."),
            sampler=d.DEFINE_string("sampler", None, "Sampler name (default the config's sampler.name)."),
            sr=d.DEFINE_bool("sr", False, "Super-resolve the result with Director-SR (needs --sr_ckpt)."),
            sr_ckpt=d.DEFINE_string("sr_ckpt", None, "Director-SR checkpoint (trainer workdir)."),
            sr_config=config_flags.DEFINE_config_file("sr_config", None, "SR model config (default: the run's own)."),
            sr_steps=d.DEFINE_integer("sr_steps", None, "SR sampler steps (default the SR config's)."),
            out=d.DEFINE_string("out", None, "Output .mp4 (OUT.png and OUT.json are written beside it)."),
            mesh=d.DEFINE_string("mesh", "auto",
                                 "Devices to shard the models over: auto (every local TPU / GPU chip on fsdp; one "
                                 "device on a CPU), single, or sizes like fsdp=2,tensor=4 (axes data, fsdp, tensor, "
                                 "sequence; the run's mesh.rules shard the weights, as in training)."),
            dtype=d.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float32"],
                                "Weights and compute of Gen and SR (auto: bfloat16 on TPU / GPU, float32 on CPU)."),
            progress=d.DEFINE_bool("progress", True, "Show a progress bar over the sampling steps."),
            allow_config_mismatch=d.DEFINE_bool("allow_config_mismatch", False,
                                                "Use --config / --sr_config even where they differ from the config "
                                                "the checkpoint was trained with (another VAE, say)."),
            max_pixels=d.DEFINE_integer("max_pixels", DEFAULT_MAX_PIXELS,
                                        "Memory budget: the most frames x height x width a request (and its SR "
                                        "output) may have; raise it on a machine with the memory."),
        )
    return _FLAGS


def request_from_flags() -> Request:
    v = {name: flag.value for name, flag in define_flags().items()}
    if not v["out"]:
        raise GenerateError("--out PATH.mp4 is required.")
    if not v["ckpt"]:
        raise GenerateError("--ckpt is required: the trainer's workdir (or its checkpoints/ directory).")
    config = v["config"]
    if config is None:  # the run's own config, recorded in its checkpoint
        config, config_path = run_config(v["ckpt"], v["step"]), f"{v['ckpt']} (its recorded config)"
    else:
        config_path = flags.FLAGS["config"].config_filename
    sr_config = v["sr_config"]
    sr_config_path = flags.FLAGS["sr_config"].config_filename if sr_config is not None else None
    if sr_config is None and v["sr"] and v["sr_ckpt"]:
        sr_config = run_config(v["sr_ckpt"], None, "--sr_ckpt")
        sr_config_path = f"{v['sr_ckpt']} (its recorded config)"
    return Request(
        config=config, ckpt=v["ckpt"], out=v["out"], keyframes=tuple(v["keyframe"]), videos=tuple(v["video"]),
        duration=v["duration"], frames=v["frames"], fps=v["fps"], height=v["height"], width=v["width"],
        caption=v["caption"], shot_captions=tuple(v["shot_caption"]), text_cache=v["text_cache"],
        text_encoder=v["text_encoder"], tokenizer=v["tokenizer"], text_dtype=v["text_dtype"], seed=v["seed"],
        steps=v["steps"], guidance=v["guidance"], keyframe_guidance=v["keyframe_guidance"], shift=v["shift"],
        sampler=v["sampler"], resize=v["resize"],
        step=v["step"], weights=v["weights"], sr=v["sr"], sr_ckpt=v["sr_ckpt"], sr_config=sr_config,
        sr_steps=v["sr_steps"], progress=v["progress"], mesh=v["mesh"], dtype=v["dtype"],
        max_pixels=v["max_pixels"],
        allow_config_mismatch=v["allow_config_mismatch"],
        config_path=config_path, sr_config_path=sr_config_path)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
    try:
        result = generate(dataclasses.replace(request_from_flags(), argv=tuple(sys.argv[1:])))
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(define_flags()["out"].value)
    ckpt = result["checkpoint"]
    source = f"checkpoint step {ckpt['step']}" if ckpt["step"] is not None else f"weights {ckpt['directory']}"
    print(f"{result['num_frames']} frames at {result['fps']:g} fps ({result['width']}x{result['height']}), "
          f"{source} -> {out}, {out.with_suffix('.png')}, "
          f"{out.with_suffix('.json')}")
    psnr = result["keyframe_psnr_db"] if not result["sr"] else result["sr"].get("keyframe_psnr_db", {})
    if psnr:
        print("keyframe PSNR: " + ", ".join(f"frame {f} {v:.1f} dB" for f, v in psnr.items()))
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, level=logging.WARNING)
