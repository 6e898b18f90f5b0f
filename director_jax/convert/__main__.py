"""Command line for weight conversion.

    python -m director_jax.convert import --model vae|dit --src PATH [--config JSON] --out DIR
    python -m director_jax.convert export --model vae|dit --src DIR --out DIR

``import`` reads any supported checkpoint (a diffusers directory, a .safetensors or .pth file in the
diffusers or official Wan2.1 layout), checks it against the model and writes this project's format:
a diffusers-layout directory. ``export`` re-writes such a directory for diffusers / PyTorch users.
``--config`` is a config.json path or an inline JSON object with diffusers' keys (AutoencoderKLWan
for the VAE, WanTransformer3DModel for the DiT). ``dit`` is the Wan2.1 T2V transformer (Director-Gen).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from director_jax.convert import dit as dit_convert
from director_jax.convert import vae as vae_convert
from director_jax.convert.state_dict import WeightMismatchError


def _config_arg(text: str | None):
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config is not valid JSON: {e}") from e
    return Path(text)


def _import(convert, name: str):
    def run(args: argparse.Namespace) -> str:
        ckpt = convert.read(args.src, _config_arg(args.config))
        model = convert.build(ckpt)
        out = convert.export(model, args.out)
        return f"imported {name}: {convert.parameter_count(model):,} parameters, {ckpt.describe()} -> {out}"
    return run


def _export(convert, name: str):
    def run(args: argparse.Namespace) -> str:
        if not Path(args.src).is_dir():
            raise ValueError(f"export reads a model directory written by `import`; {args.src} is not a directory "
                             "(use `import` for weight files).")
        ckpt = convert.read(args.src, _config_arg(args.config))
        model = convert.build(ckpt)
        out = convert.export(model, args.out)
        return (f"exported {name}: {convert.parameter_count(model):,} parameters, {ckpt.describe()} -> {out} "
                "(diffusers)")
    return run


@dataclasses.dataclass(frozen=True)
class _Converter:
    read: Callable
    build: Callable
    export: Callable
    parameter_count: Callable


_CONVERTERS = {
    "vae": _Converter(vae_convert.read_vae_checkpoint, vae_convert.vae_from_checkpoint, vae_convert.export_vae,
                      vae_convert.parameter_count),
    "dit": _Converter(dit_convert.read_transformer_checkpoint, dit_convert.transformer_from_checkpoint,
                      dit_convert.export_transformer, dit_convert.parameter_count),
}

# model name -> command -> handler; add "sr" here.
MODELS: dict[str, dict[str, Callable[[argparse.Namespace], str]]] = {
    name: {"import": _import(conv, name), "export": _export(conv, name)} for name, conv in _CONVERTERS.items()
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m director_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("import", "any supported checkpoint -> this project's format"),
                       ("export", "this project's format -> a diffusers directory")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--model", required=True, help=f"which model's weights: {', '.join(sorted(MODELS))}")
        sub.add_argument("--src", required=True, help="the checkpoint to read")
        sub.add_argument("--config", help="config.json path or inline JSON (needed for bare diffusers files)")
        sub.add_argument("--out", required=True, help="the directory to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = MODELS.get(args.model)
    if handlers is None:
        print(f"error: --model {args.model!r} cannot be converted yet; supported: {', '.join(sorted(MODELS))}.",
              file=sys.stderr)
        return 2
    try:
        print(handlers[args.command](args))
    except (WeightMismatchError, OSError, ValueError) as e:  # user errors: a message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
