"""``python -m director_jax.pytorch``: a Director-Gen video in PyTorch from exported weights (no JAX model).

    python -m director_jax.pytorch --vae export/vae --transformer export/dit --config runs/gen/config.json \\
        --keyframe a.png@0 --keyframe b.png@#18 --caption "a red ball rolls" --text_cache text_cache \\
        --seed 0 --out out/torch.mp4

writes ``out/torch.mp4``, ``out/torch.png`` (a contact sheet, keyframes outlined) and ``out/torch.json``
(every setting, the inputs' paths and SHA-256, and the SHA-256 of the other two files), published
together (staged beside OUT, OUT.json moved last) under the lock ``OUT.lock``, as ``python -m
director_jax.generate`` writes its video. ``--out`` may be an ``.npy`` (the raw frames in [-1, 1])
instead of an ``.mp4``.

``--vae`` and ``--transformer`` are the directories ``python -m director_jax.convert export --model
vae|dit`` writes. ``--keyframe PATH@TIME`` (repeated; TIME in seconds, ``1.5`` or ``1.5s``, or a frame,
``#12``) puts the keyframes on the timeline; an image of another size than the video is refused, or
resized (bicubic) with ``--resize``.

``--config`` is the Director-Gen training config the model was trained with (a config file such as
configs/gen_tiny.py, a run's ``config.json`` or the run's workdir): the sampler, steps, shift,
guidance, keyframe guidance, negative caption, frames, fps, height and width default to its values
(a flag given wins), and its ``text`` section says whether the model reads captions. Without
``--config`` the defaults are the sampler unipc, 50 steps, shift 5, guidance 1 (off), keyframe
guidance 1 (off), 16 fps, the first keyframe's size, and ``--frames`` is required.

Text: ``--caption TEXT --text_cache DIR`` reads the caption's umT5 embeddings (and, with guidance, the
negative caption's) from the cache ``python -m director_jax.embed_text --captions FILE --cache DIR``
fills; ``--text_embeddings FILE.npy`` (Lt, D) or (1, Lt, D) gives them directly
(``--negative_embeddings`` likewise, for guidance). With neither, or with a config whose
``text.conditioning`` is False, the text is the zero embedding of a model trained without captions
(OUT.json says which).

The initial noise is ``jax.random.key(--seed)``'s, the tensor the JAX pipeline draws, or ``--noise``
(a ``.npy`` of (1, L, h, w, z)). Every input is checked before the models load; a bad one is one line
``error: ...``, exit code 2, and nothing is written. The library behind it: ``pytorch/command.py``
(inputs and outputs) and ``pytorch/pipeline.py`` (``TorchDirectorPipeline``).
"""

from __future__ import annotations

import sys

from absl import flags

from director_jax import cli
from director_jax.errors import UserError
from director_jax.pytorch.command import BUILTIN, Flags, check_inputs
from director_jax.pytorch.outputs import output_lock, output_paths, write_outputs
from director_jax.pytorch.pipeline import TorchDirectorPipeline

_CFG = "default: the --config's {}, else {}"
_VAE = flags.DEFINE_string("vae", None, "Exported diffusers AutoencoderKLWan directory (required).")
_TRANSFORMER = flags.DEFINE_string("transformer", None, "Exported Director-Gen transformer directory (required).")
_KEYFRAME = flags.DEFINE_multi_string("keyframe", [], "PATH@TIME: PATH@#FRAME or PATH@SECONDS (repeat; required).")
_OUT = flags.DEFINE_string("out", None, "Output .mp4 (or .npy: raw frames in [-1, 1]); OUT.png and OUT.json go "
                                        "beside it (required).")
_CONFIG = flags.DEFINE_string("config", None, "The Director-Gen training config of the model (configs/gen_*.py, a "
                                              "run's config.json or its workdir): the defaults of the sampling and "
                                              "video settings. Without it: built-in defaults, --frames required.")
_FRAMES = flags.DEFINE_integer("frames", None, "Pixel frames of the video (default: the --config's "
                                               "video.num_frames; required without --config).")
_FPS = flags.DEFINE_float("fps", None, "Frames per second: keyframe times in seconds, the mp4's rate ("
                          + _CFG.format("video.fps", f"{BUILTIN['fps']:g}") + ").")
_HEIGHT = flags.DEFINE_integer("height", None, "Video height (" + _CFG.format("video.height", "the first keyframe's")
                               + ").")
_WIDTH = flags.DEFINE_integer("width", None, "Video width (" + _CFG.format("video.width", "the first keyframe's")
                              + ").")
_CAPTION = flags.DEFINE_string("caption", None, "The caption, read from --text_cache (default: none, the zero text of "
                                                "a model trained without captions).")
_TEXT_CACHE = flags.DEFINE_string("text_cache", None, "umT5 text-embedding cache holding --caption (python -m "
                                                      "director_jax.embed_text --captions FILE --cache DIR).")
_NEGATIVE_CAPTION = flags.DEFINE_string("negative_caption", None, "Negative caption for guidance, from --text_cache ("
                                        + _CFG.format("sampler.negative_prompt", "''") + ").")
_TEXT = flags.DEFINE_string("text_embeddings", None, ".npy caption embeddings (Lt, D) or (1, Lt, D), instead of "
                                                     "--caption.")
_NEGATIVE = flags.DEFINE_string("negative_embeddings", None, ".npy negative caption embeddings (guidance with "
                                                             "--text_embeddings).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale, 1 = off ("
                               + _CFG.format("sampler.guidance_scale", f"{BUILTIN['guidance_scale']:g}") + ").")
flags.DEFINE_alias("guidance", "guidance_scale")  # generate's name
_KEYFRAME_GUIDANCE = flags.DEFINE_float("keyframe_guidance", None, "Keyframe guidance scale, 1 = off ("
                                        + _CFG.format("sampler.keyframe_guidance",
                                                      f"{BUILTIN['keyframe_guidance']:g}") + ").")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (" + _CFG.format("sampler.steps", BUILTIN["steps"])
                              + ").")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["unipc", "euler"], "diffusers' scheduler ("
                             + _CFG.format("sampler.name", BUILTIN["sampler"]) + ").")
_SHIFT = flags.DEFINE_float("shift", None, "Flow shift of the sigma schedule ("
                            + _CFG.format("sampler.shift", f"{BUILTIN['shift']:g}") + ").")
_RESIZE = flags.DEFINE_bool("resize", False, "Resize keyframes of another size than the video (bicubic), not "
                                             "refuse them.")
_SEED = flags.DEFINE_integer("seed", 0, "jax.random.key(seed) noise: the JAX pipeline's.")
_NOISE = flags.DEFINE_string("noise", None, ".npy initial noise (1, L, h, w, z) instead of --seed.")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device, e.g. cpu or cuda.")


def flags_values() -> Flags:
    return Flags(vae=_VAE.value, transformer=_TRANSFORMER.value, keyframes=tuple(_KEYFRAME.value), out=_OUT.value,
                 config=_CONFIG.value, frames=_FRAMES.value, fps=_FPS.value, height=_HEIGHT.value, width=_WIDTH.value,
                 caption=_CAPTION.value, text_cache=_TEXT_CACHE.value, negative_caption=_NEGATIVE_CAPTION.value,
                 text_embeddings=_TEXT.value, negative_embeddings=_NEGATIVE.value, steps=_STEPS.value,
                 sampler=_SAMPLER.value, shift=_SHIFT.value, guidance_scale=_GUIDANCE.value,
                 keyframe_guidance=_KEYFRAME_GUIDANCE.value, resize=_RESIZE.value, seed=_SEED.value, noise=_NOISE.value,
                 device=_DEVICE.value, argv=tuple(sys.argv[1:]))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {' '.join(argv[1:])!r}: every input is a flag (see --help).")
    inputs = check_inputs(flags_values())
    s = inputs.sampling
    with output_lock(_OUT.value):
        pipe = TorchDirectorPipeline.from_pretrained(_VAE.value, _TRANSFORMER.value, device=_DEVICE.value)
        video, _ = pipe(inputs.layout, inputs.video, inputs.text, inputs.noise, text_mask=inputs.text_mask,
                        negative_text=inputs.negative, negative_mask=inputs.negative_mask, steps=s.steps,
                        sampler=s.sampler, shift=s.shift, guidance_scale=s.guidance_scale,
                        keyframe_guidance=s.keyframe_guidance)
        write_outputs(_OUT.value, video[0], fps=inputs.fps, given=inputs.video[0],
                      keyframes=[k["frame"] for k in inputs.keyframes], settings=inputs.settings)
    paths = ", ".join(str(p) for p in output_paths(_OUT.value))
    print(f"wrote {paths}: {inputs.num_frames} frames at {inputs.fps:g} fps ({inputs.width}x{inputs.height}), "
          f"keyframes at {[k['frame'] for k in inputs.keyframes]}, {s.sampler} {s.steps} steps")
    print(inputs.layout.describe())


if __name__ == "__main__":
    cli.run(main)
