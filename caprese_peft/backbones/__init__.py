"""Sparse feed-forward backbones, as pure-torch references."""

from .base import (
    Backbone,
    available_backbones,
    check_density,
    get_backbone,
    register_backbone,
    reselection_backbones,
)
from .cats import Cats, CatsStats
from .griffin import Griffin, GriffinStats

__all__ = [
    "Backbone",
    "Cats",
    "CatsStats",
    "Griffin",
    "GriffinStats",
    "available_backbones",
    "check_density",
    "get_backbone",
    "register_backbone",
    "reselection_backbones",
]
