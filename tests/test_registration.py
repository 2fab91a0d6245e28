"""Fails loudly if a PEFT release breaks how Caprese extends PEFT's closed set of methods."""

from __future__ import annotations

import json
from importlib.metadata import requires, version

import peft
from packaging.requirements import Requirement
from peft import PeftConfig, PeftModelForCausalLM, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import caprese_peft
from caprese_peft import CapreseConfig, CapreseModel

from conftest import tiny_model


def test_installed_peft_is_in_the_tested_range():
    pins = [Requirement(r) for r in requires("caprese-peft") if r.startswith("peft")]
    assert pins, "setup.cfg must pin the PEFT range Caprese is tested with"
    assert pins[0].specifier.contains(version("peft")), f"peft {peft.__version__} is outside {pins[0].specifier}"


def test_caprese_is_a_peft_type_with_its_classes():
    assert PeftType("CAPRESE") is caprese_peft.CAPRESE
    assert PEFT_TYPE_TO_CONFIG_MAPPING[caprese_peft.CAPRESE] is CapreseConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[caprese_peft.CAPRESE] is CapreseModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[caprese_peft.CAPRESE] == "caprese_"
    caprese_peft.register(CapreseConfig, CapreseModel)  # idempotent


def test_get_peft_model_and_config_files(tmp_path):
    model = get_peft_model(tiny_model("llama"), CapreseConfig(r=4))
    assert isinstance(model, PeftModelForCausalLM)
    assert isinstance(model.base_model, CapreseModel)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "CAPRESE"
    assert written["task_type"] == "CAUSAL_LM"
    assert (written["hidden_size"], written["intermediate_size"]) == (48, 90)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), CapreseConfig)
