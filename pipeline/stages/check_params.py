"""``python -m pipeline check-params``: validate the parameters and print them, resolved."""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from pipeline.config import Params, params_to_dict


def main(args: argparse.Namespace, params: Params) -> int:
    del args
    print(OmegaConf.to_yaml(params_to_dict(params)), end="")
    return 0
