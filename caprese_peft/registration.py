"""Makes "CAPRESE" a PEFT type: the only module that touches PEFT internals.

PEFT accepts only members of its closed ``PeftType`` enum. We add one member with ``aenum`` (the
maintained way to extend a standard-library enum) and then use PEFT's public
``register_peft_method``. ``tests/test_registration.py`` fails loudly if a PEFT release changes
either step.
"""

from __future__ import annotations

import aenum
from peft.utils import PeftType

NAME = "caprese"
PREFIX = "caprese_"


def _peft_type() -> PeftType:
    if NAME.upper() not in PeftType.__members__:
        aenum.extend_enum(PeftType, NAME.upper(), NAME.upper())
    return PeftType[NAME.upper()]


CAPRESE: PeftType = _peft_type()


def register(config_cls: type, model_cls: type) -> None:
    """Register the Caprese config and tuner with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(CAPRESE) is config_cls:
        return
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
