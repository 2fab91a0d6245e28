"""Makes "CAPRESE" a PEFT type: the only module that touches PEFT internals.

PEFT accepts only members of its closed ``PeftType`` enum. We add one member with ``aenum`` (the
maintained way to extend a standard-library enum) and then use PEFT's public
``register_peft_method``. ``tests/test_registration.py`` fails loudly if a PEFT release changes
either step.

It also hooks Caprese's model card into ``save_pretrained`` and ``push_to_hub`` (``hook_model_card``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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


def hook_model_card(write_card: Callable[[Any, str, Callable[[], None]], Any]) -> None:
    """Make ``save_pretrained`` and ``push_to_hub`` of PEFT models with a Caprese adapter write Caprese's card.

    PEFT writes README.md in ``PeftModel.create_or_update_model_card``, called by ``save_pretrained``; it
    has no extension point, so for Caprese models we wrap it: ``write_card(model, output_dir, peft_update)``
    runs PEFT's update itself. ``push_to_hub`` (transformers' ``PushToHubMixin``) then overwrites README.md
    with the repo's current card or a stand-in before ``_upload_modified_files``; wrapping that method on
    ``PeftModel`` updates the card again just before the upload. Other PEFT models are untouched.
    ``tests/test_model_card.py`` fails if a PEFT or transformers release changes either step. Idempotent.
    """
    from peft import PeftModel

    if getattr(PeftModel.create_or_update_model_card, "__caprese__", False):
        return
    peft_card = PeftModel.create_or_update_model_card
    upload = PeftModel._upload_modified_files

    def is_caprese(model: Any) -> bool:
        configs = getattr(model, "peft_config", None) or {}
        return any(getattr(c, "peft_type", None) == CAPRESE for c in configs.values())

    @functools.wraps(peft_card)
    def create_or_update_model_card(self, output_dir: str):
        if not is_caprese(self):
            return peft_card(self, output_dir)
        write_card(self, output_dir, lambda: peft_card(self, output_dir))

    @functools.wraps(upload)
    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        if is_caprese(self):
            self.create_or_update_model_card(working_dir)
        return upload(self, working_dir, repo_id, *args, **kwargs)

    create_or_update_model_card.__caprese__ = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel._upload_modified_files = _upload_modified_files
