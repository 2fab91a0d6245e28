"""Parameter accounting, checked by hand on a tiny model and against the paper's Llama 3.1 8B figure."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from caprese_peft import CapreseConfig, parameter_report

from conftest import tiny_model

D, F, LAYERS = 48, 90, 4


def test_cats_counts_by_hand():
    base = tiny_model("llama")
    total = sum(p.numel() for p in base.parameters())
    report = parameter_report(get_peft_model(base, CapreseConfig(backbone="cats", density=0.5, r=4)))
    assert report.total == total
    assert report.adapter == LAYERS * 2 * D * 4
    assert report.ff_total == LAYERS * 3 * D * F
    assert report.ff_skipped == LAYERS * 2 * D * F // 2  # half of up and down; the gate always runs
    assert report.active_per_token == total - report.ff_skipped + report.adapter


def test_griffin_first_half_counts_by_hand():
    base = tiny_model("gemma2")
    report = parameter_report(
        get_peft_model(base, CapreseConfig(backbone="griffin", density=0.3, r=8, layers_to_transform=[0, 1]))
    )
    kept = round(0.3 * F)
    assert report.ff_skipped == 2 * 3 * D * (F - kept)
    assert report.adapter == 2 * 2 * D * 8


def test_llama_3_1_8b_cuts_about_two_billion_active_parameters():
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    with torch.device("meta"):  # shapes only, no memory
        base = AutoModelForCausalLM.from_config(config)
    report = parameter_report(get_peft_model(base, CapreseConfig(backbone="cats", density=0.5, r=256)))
    assert report.total == pytest.approx(8.03e9, rel=0.01)
    assert report.ff_skipped == pytest.approx(1.88e9, rel=0.01)
    assert report.adapter / report.total == pytest.approx(0.0084, rel=0.02)  # the paper's ~0.8%
    assert "fewer" in str(report)


def test_report_needs_a_caprese_model():
    with pytest.raises(ValueError, match="no Caprese layers"):
        parameter_report(tiny_model("llama"))


def test_a_stand_in_reads_the_skipped_weights_again_at_its_bits():
    model = get_peft_model(tiny_model("llama"), CapreseConfig(backbone="cats", density=0.5, r=4, stand_in_bits=4))
    report = parameter_report(model)
    assert report.stand_in == report.ff_skipped and report.stand_in_bits == 4
    assert report.bytes_per_token(4) == report.active_per_token * 4 + report.ff_skipped / 2
    assert "stand-in reads" in str(report)
