"""Imports every checkpoint family module so each registers its reader (order = discovery priority)."""

from __future__ import annotations

import importlib

FAMILY_MODULES = ("universal", "deepspeed", "megatron_legacy", "dcp", "safetensors_hf")

for _name in FAMILY_MODULES:
    try:
        importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as exc:  # a family module not written yet
        if exc.name != f"{__package__}.{_name}":
            raise
