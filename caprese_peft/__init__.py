"""Caprese for PEFT: sparse feed-forward decoding with a distilled low-rank correction.

``import caprese_peft`` registers the "CAPRESE" PEFT type, so ``peft.get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` accept Caprese adapters.
"""

from pathlib import Path as _Path

from .accounting import ParameterReport, parameter_report
from .backbones import Backbone, SparseDecoder, available_backbones, register_backbone
from .config import CapreseConfig
from .decoding import decode_impl, release_decode_caches, set_decode_impl
from .density import test_time_density
from .fast_decode import FastDecoder
from .layer import CapreseLayer, Observation
from .loading import load_gguf_model, load_smollm2, smollm2_gguf_path
from .model import CapreseModel
from .model_card import update_model_card, write_model_card
from .registration import CAPRESE, hook_model_card, register
from .state import observing, teacher_forcing

# pip installs the repo folder kernels/ as caprese_peft.kernels (setup.cfg, package_dir). A source checkout used
# without installing it (PYTHONPATH=<checkout>, as on a machine that cannot install) finds it in the folder beside
# this package: search the checkout's root too, after this package's own folder.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "kernels").is_dir() and (_CHECKOUT / "kernels" / "cats_ff.py").is_file():
    __path__.append(str(_CHECKOUT))

register(CapreseConfig, CapreseModel)
hook_model_card(write_model_card)

__version__ = "0.1.0"

_DISTILL_EXPORTS = ("CapreseTrainer", "CapreseTrainingArguments", "layerwise_losses")


def __getattr__(name: str):
    # distillation is an extra (the trainer imports transformers.Trainer, which imports datasets): load it when asked
    if name in _DISTILL_EXPORTS:
        from . import distill

        return getattr(distill, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CAPRESE",
    "Backbone",
    "CapreseConfig",
    "CapreseLayer",
    "CapreseModel",
    "Observation",
    "CapreseTrainer",
    "CapreseTrainingArguments",
    "FastDecoder",
    "ParameterReport",
    "SparseDecoder",
    "available_backbones",
    "decode_impl",
    "load_gguf_model",
    "layerwise_losses",
    "load_smollm2",
    "observing",
    "parameter_report",
    "register_backbone",
    "release_decode_caches",
    "set_decode_impl",
    "smollm2_gguf_path",
    "teacher_forcing",
    "test_time_density",
    "update_model_card",
]
