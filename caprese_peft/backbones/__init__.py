"""Sparse feed-forward backbones, as pure-torch references, each with the decoder that computes its generated tokens."""

from .base import (
    DECODE_IMPLS,
    Backbone,
    SparseDecoder,
    available_backbones,
    check_density,
    get_backbone,
    register_backbone,
    reselection_backbones,
)
from .cats import Cats, CatsDecoder, CatsStats
from .griffin import Griffin, GriffinDecoder, GriffinStats

__all__ = [
    "DECODE_IMPLS",
    "Backbone",
    "Cats",
    "CatsDecoder",
    "CatsStats",
    "Griffin",
    "GriffinDecoder",
    "GriffinStats",
    "SparseDecoder",
    "available_backbones",
    "check_density",
    "get_backbone",
    "register_backbone",
    "reselection_backbones",
]
