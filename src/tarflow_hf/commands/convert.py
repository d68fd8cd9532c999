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

from ..registry import APPLE_AMLR, FAMILIES, STARFLOW, ModelFamily
from . import CommandError


def _origin(family: ModelFamily) -> str:
    """How the messages name a family's checkpoints: `TarFlow (apple/ml-tarflow)`."""
    return f"{family.title} (apple/ml-{family.name})"


def _given(args: argparse.Namespace, flags: tuple[tuple[str, str], ...]) -> list[str]:
    return [flag for flag, name in flags if getattr(args, name, None) not in (None, False)]


def _check_flags(args: argparse.Namespace, family: ModelFamily) -> None:
    """Refuse the other family's options, and (with --reverse) the options that only matter when converting."""
    own = args.family_flags[family.name]
    for other, flags in args.family_flags.items():
        misplaced = _given(args, flags) if other != family.name else []
        if misplaced:
            takes = ", ".join(flag for flag, _ in own)
            raise CommandError(
                f"{', '.join(misplaced)} apply to {_origin(FAMILIES[other])} checkpoints; {args.source} is a "
                f"{_origin(family)} one (it takes {takes})"
            )
    if args.reverse and _given(args, own):
        raise CommandError(
            f"--reverse takes no {', '.join(_given(args, own))}: they only matter when converting a .pth"
        )


def run(args: argparse.Namespace) -> int:
    from ..apple_checkpoints import source_family

    family = source_family(args.source)  # an unreadable file is reported here, as what it is
    _check_flags(args, family)
    if args.reverse:
        return _reverse(args, family)
    return _convert_starflow(args) if family is STARFLOW else _convert_tarflow(args)


def _reverse(args: argparse.Namespace, family: ModelFamily) -> int:
    from ..convert import export_ml_tarflow_checkpoint
    from ..convert_starflow import export_ml_starflow_checkpoint

    export = export_ml_starflow_checkpoint if family is STARFLOW else export_ml_tarflow_checkpoint
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
