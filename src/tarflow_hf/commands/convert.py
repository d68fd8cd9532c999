"""`tarflow-hf convert`: an Apple checkpoint (apple/ml-tarflow or apple/ml-starflow, recognised by its weights) to a
pipeline folder, or back with `--reverse`. The conversions themselves are `tarflow_hf.convert` and
`tarflow_hf.convert_starflow`; this module checks which flags go with which family and prints what was done.

    tarflow-hf convert afhq_model_8_768_8_8_0.07.pth tarflow-afhq-256
    tarflow-hf convert starflow_3B_t2i_256x256.pth starflow-3b --config starflow_3B_t2i_256x256.yaml
    tarflow-hf convert --reverse tarflow-afhq-256 afhq_again.pth
"""

from __future__ import annotations

import argparse
import sys

from . import CommandError

# (flag, argument name) of the options that apply to one family's checkpoints only.
TARFLOW_FLAGS = (("--noise-std", "noise_std"), ("--in-channels", "in_channels"), ("--labels", "labels"))
STARFLOW_FLAGS = (
    ("--config", "config"),
    ("--license-file", "license_file"),
    ("--transformer-only", "transformer_only"),
    ("--text-encoder", "text_encoder"),
    ("--vae", "vae"),
)


def _given(args: argparse.Namespace, flags: tuple[tuple[str, str], ...]) -> list[str]:
    return [flag for flag, name in flags if getattr(args, name, None) not in (None, False)]


def run(args: argparse.Namespace) -> int:
    from .. import convert_starflow

    starflow = convert_starflow.is_starflow_source(args.source)
    own, other = (STARFLOW_FLAGS, TARFLOW_FLAGS) if starflow else (TARFLOW_FLAGS, STARFLOW_FLAGS)
    misplaced = _given(args, other)
    if misplaced:
        kinds = ("TarFlow (apple/ml-tarflow)", "STARFlow (apple/ml-starflow)")
        mine, theirs = kinds[::-1] if starflow else kinds
        takes = ", ".join(flag for flag, _ in own)
        raise CommandError(
            f"{', '.join(misplaced)} apply to {theirs} checkpoints; {args.source} is a {mine} one (it takes {takes})"
        )
    if args.reverse and _given(args, own):
        raise CommandError(
            f"--reverse takes no {', '.join(_given(args, own))}: they only matter when converting a .pth"
        )
    if args.reverse:
        return _reverse(args, starflow)
    return _convert_starflow(args) if starflow else _convert_tarflow(args)


def _reverse(args: argparse.Namespace, starflow: bool) -> int:
    from ..convert import export_ml_tarflow_checkpoint
    from ..convert_starflow import export_ml_starflow_checkpoint

    export = export_ml_starflow_checkpoint if starflow else export_ml_tarflow_checkpoint
    print(f"wrote {export(args.source, args.destination, overwrite=args.overwrite)}")
    return 0


def _convert_tarflow(args: argparse.Namespace) -> int:
    from ..convert import convert_ml_tarflow_checkpoint, describe_config

    config = convert_ml_tarflow_checkpoint(
        args.source,
        args.destination,
        num_channels=args.in_channels,
        noise_std=args.noise_std,
        labels=args.labels,
        overwrite=args.overwrite,
    )
    names = list(config.id2label.values())
    shown = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if config.num_classes else ""
    print(f"converted {args.source} -> {args.destination}: {describe_config(config)}{shown}")
    return 0


def _convert_starflow(args: argparse.Namespace) -> int:
    from ..convert_starflow import assumed_settings_note, convert_ml_starflow_pipeline, describe_config
    from ..registry import APPLE_AMLR

    if args.transformer_only and (args.text_encoder or args.vae):
        given = ", ".join(flag for flag, value in (("--text-encoder", args.text_encoder), ("--vae", args.vae)) if value)
        raise CommandError(f"--transformer-only writes no text encoder or VAE; drop {given}")
    if args.config is None:
        print(assumed_settings_note())
    config = convert_ml_starflow_pipeline(
        args.source,
        args.destination,
        config_yaml=args.config,
        license_file=args.license_file,
        text_encoder=args.text_encoder,
        vae=args.vae,
        transformer_only=args.transformer_only,
        overwrite=args.overwrite,
        warn_assumed=False,  # printed above
    )
    what = "transformer" if args.transformer_only else "pipeline"
    print(f"converted {args.source} -> {args.destination} ({what}): {describe_config(config)}")
    print(APPLE_AMLR.note)
    if args.license_file is None:
        print(
            f"warning: the folder does not carry the license's text, which must go with the weights when they are "
            f"shared; convert again with --license-file {APPLE_AMLR.text_name} ({APPLE_AMLR.link})",
            file=sys.stderr,
        )
    return 0
