"""The shipped DeepSpeed configurations (JSON files beside this file).

A package only so that an installed copy (``pip install .``) carries them: code finds them as
``Path(<package>.__file__).parents[1] / "ds_configs"``, which is the same place in a checkout
and in site-packages.
"""
from pathlib import Path

DIR = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """Path of a shipped config, e.g. ``path("squad.json")``."""
    return DIR / name
