"""Platforms behind the machine contract; each module exposes ``create_machines``."""

from __future__ import annotations

import importlib

from components.machine import Platform


def platform(name: str) -> Platform:
    """The ``create_machines`` function of platform ``name`` (validated in config)."""
    return importlib.import_module(f"components.platforms.{name}").create_machines
