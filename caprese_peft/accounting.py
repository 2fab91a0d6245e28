"""Parameter accounting: what a Caprese model holds and what a generated token actually uses."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layer import CapreseLayer, caprese_layers


@dataclass(frozen=True)
class ParameterReport:
    """Parameter counts of a model with a Caprese adapter (embeddings and LM head included in both totals)."""

    total: int  # parameters of the base model
    active_per_token: int  # parameters a generated token reads: base minus skipped FF weights, plus the adapter
    adapter: int  # parameters Caprese adds (L and R of the active adapter)
    ff_total: int  # weights of the wrapped FF blocks
    ff_skipped: int  # FF weights a generated token skips
    stand_in: int = 0  # quantized weights a generated token reads for the dropped neurons (stand_in_bits)
    stand_in_bits: int | None = None

    def bytes_per_token(self, bytes_per_parameter: float) -> float:
        """Weight bytes a generated token reads: the active parameters at ``bytes_per_parameter`` (4 for fp32, 2 for
        bf16), the stand-in's quantized weights at their bits (their per-row scales are negligible)."""
        return self.active_per_token * bytes_per_parameter + self.stand_in * (self.stand_in_bits or 0) / 8

    @property
    def active_fraction(self) -> float:
        return self.active_per_token / self.total

    @property
    def adapter_fraction(self) -> float:
        return self.adapter / self.total

    def __str__(self) -> str:
        return (
            f"total {self.total:,} | active per generated token {self.active_per_token:,} "
            f"({self.active_fraction:.1%}; {self.total - self.active_per_token:,} fewer) | "
            f"adapter adds {self.adapter:,} ({self.adapter_fraction:.2%})"
            + (f" | stand-in reads {self.stand_in:,} weights at {self.stand_in_bits} bits" if self.stand_in else "")
        )


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count total, active-per-generated-token and added parameters of a (PEFT) model with a Caprese adapter.

    The per-token count is the backbone's nominal one: GRIFFIN keeps ``round(density * d_ff)``
    neurons of gate, up and down; CATS runs the whole gate projection and on average a ``density``
    fraction of up and down. A stand-in (``stand_in_bits``) reads the skipped weights again, quantized.
    """
    layers = caprese_layers(model)
    adapter_ids = {
        id(p)
        for layer in layers
        for name in CapreseLayer.adapter_layer_names
        for p in getattr(layer, name).parameters()
    }
    total = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)

    adapter = ff_total = ff_skipped = stand_in = 0
    bits = set()
    for layer in layers:
        ff = 3 * layer.hidden_size * layer.intermediate_size
        ff_total += ff
        name = layer.active_adapter_name()
        if name is None:
            continue
        active = layer.caprese_backbone[name].active_ff_weights(layer.hidden_size, layer.intermediate_size)
        ff_skipped += round(ff - active)
        adapter += layer.caprese_L[name].numel() + layer.caprese_R[name].numel()
        if layer.caprese_stand_in.get(name):
            stand_in += round(ff - active)
            bits.add(layer.caprese_stand_in[name])
    return ParameterReport(
        total=total,
        active_per_token=total - ff_skipped + adapter,
        adapter=adapter,
        ff_total=ff_total,
        ff_skipped=ff_skipped,
        stand_in=stand_in,
        stand_in_bits=max(bits) if bits else None,
    )
