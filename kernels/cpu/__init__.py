"""CPU decode kernels (C++ ops built on first use); each names the pure-torch reference it must match."""

from .ops import (
    SUPPORTED_DTYPES,
    GatedFFWeights,
    GriffinUnionWeights,
    build_error,
    cats_ff_cpu,
    dense_ff,
    extension_name,
    gated_ff,
    gated_ff_reference,
    griffin_union_ff,
    griffin_union_weights,
    isa,
    linear,
    linear_reference,
    load_extension,
    prepare_dense_weights,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "GatedFFWeights",
    "GriffinUnionWeights",
    "build_error",
    "cats_ff_cpu",
    "dense_ff",
    "extension_name",
    "gated_ff",
    "gated_ff_reference",
    "griffin_union_ff",
    "griffin_union_weights",
    "isa",
    "linear",
    "linear_reference",
    "load_extension",
    "prepare_dense_weights",
]
