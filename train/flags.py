"""Training flags shared by `smearscope train` and the accelerator trainer; no Keras, so the CLI stays quick."""
from __future__ import annotations

import argparse


def add_augment_flags(parser: argparse.ArgumentParser) -> None:
    """Augmentation beyond the tutorial's (train.recipe.Augment); the defaults are the tutorial's."""
    parser.add_argument("--rotation", type=float, default=20.0, help="largest rotation either way, degrees")
    parser.add_argument("--channel-gain", type=float, default=0.0, help="per-channel gain range, log scale (0: off)")
    parser.add_argument("--desaturate", type=float, default=0.0, help="largest blend toward grey, 0..1 (0: off)")


def augment_settings(args: argparse.Namespace) -> dict[str, float]:
    """The TrainConfig fields that `add_augment_flags` set, by name."""
    return {"rotation": args.rotation, "channel_gain": args.channel_gain, "desaturate": args.desaturate}
