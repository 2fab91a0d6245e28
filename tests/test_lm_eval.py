"""lm-evaluation-harness on a Caprese adapter: `caprese-peft lm-eval` registers Caprese, then runs lm-eval's CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from peft import PeftModel, get_peft_model

from caprese_peft import CapreseConfig
from caprese_peft.cli import main

from conftest import tiny_model, tiny_tokenizer

QUESTIONS = ["what is two plus three", "think what is five", "the answer is"]
TASK = """task: caprese_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_wrapper_registers_caprese_then_hands_its_arguments_to_lm_eval(monkeypatch):
    seen = {}

    def cli_evaluate():
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        seen["argv"] = list(sys.argv)
        seen["registered"] = "CAPRESE" in {getattr(k, "value", k) for k in PEFT_TYPE_TO_CONFIG_MAPPING}

    fake = types.ModuleType("lm_eval.__main__")
    fake.cli_evaluate = cli_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", types.ModuleType("lm_eval"))
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", fake)
    argv = ["--model", "hf", "--model_args", "pretrained=base,peft=adapter", "--tasks", "gsm8k", "--help-like"]
    before = list(sys.argv)
    main(["lm-eval", *argv])
    assert seen == {"argv": ["lm-eval", *argv], "registered": True}
    assert sys.argv == before


def test_wrapper_says_how_to_install_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)
    with pytest.raises(SystemExit, match=r"pip install 'caprese-peft\[lm-eval\]'"):
        main(["lm-eval", "--tasks", "gsm8k"])


def test_lm_eval_runs_a_local_task_on_a_caprese_adapter_offline(tmp_path):
    pytest.importorskip("lm_eval")
    tokenizer = tiny_tokenizer(tuple(str(i) for i in range(80)))  # 96 tokens: the tiny model's vocabulary
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    torch.manual_seed(0)
    config = CapreseConfig(backbone="cats", density=0.5, r=4, init_weights=False)
    get_peft_model(tiny_model("llama"), config).save_pretrained(tmp_path / "adapter")
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "5"}) + "\n" for q in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=data))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    model_args = f"pretrained={tmp_path / 'tiny'},peft={tmp_path / 'adapter'},dtype=float32"
    command = [sys.executable, "-m", "caprese_peft.lm_eval", "--model", "hf", "--model_args", model_args]
    command += ["--tasks", "caprese_tiny", "--include_path", str(tmp_path / "tasks"), "--device", "cpu"]
    command += ["--batch_size", "1", "--output_path", str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]

    (samples_file,) = (tmp_path / "out").rglob("samples_caprese_tiny_*.jsonl")
    samples = {s["doc"]["question"]: s["resps"][0][0] for s in map(json.loads, samples_file.read_text().splitlines())}
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert "exact_match,none" in results["results"]["caprese_tiny"]

    # lm-eval's answers are the Caprese model's greedy answers, not the dense model's
    model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    differs = False
    for question in QUESTIONS:
        ids = torch.tensor([tokenizer(question)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        caprese = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        with model.disable_adapter():
            dense = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
            )
        assert samples[question].split() == caprese.split(), question
        differs |= not torch.equal(out, dense)
    assert differs
