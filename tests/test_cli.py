"""The `caprese-peft` command end to end on a tiny model: synth, then layer-wise, closed-form and e2e distill."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from peft import PeftModel

from caprese_peft.cli import main
from caprese_peft.data import load_problems, user_message
from caprese_peft.distill.synth import completed_ids

from conftest import tiny_model, tiny_tokenizer

QUESTIONS = ["what is two plus three", "what is three plus two", "what is five plus two", "think what is five"]


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer(tuple(f"w{i}" for i in range(80))).save_pretrained(folder)  # every model id decodes to a word
    return folder


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [{"question": q, "answer": f"#### {i}"} for i, q in enumerate(QUESTIONS * 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_problems_splits_and_fields(problems_file):
    train = load_problems(problems_file, split="train", dev_size=4)
    dev = load_problems(problems_file, split="dev", dev_size=4)
    assert [p["id"] for p in train] == list(range(8)) and [p["id"] for p in dev] == list(range(8, 12))
    assert dev[0] == {"id": 8, "question": QUESTIONS[0], "answer": "#### 8"}
    assert len(load_problems(problems_file, split="all", limit=5)) == 5
    with pytest.raises(ValueError, match=r"need a question field \(\['query'\]\); found \['answer', 'question'\]"):
        load_problems(problems_file, question_field="query")
    with pytest.raises(FileNotFoundError, match="No data file"):
        load_problems(problems_file.with_name("missing.jsonl"))
    assert user_message("what is two", "think")[0]["content"] == "what is two\nthink"


def test_synth_then_distill_all_stages(tmp_path, model_dir, problems_file):
    data = tmp_path / "synth.jsonl"
    synth = ["synth", "--model", str(model_dir), "--data", str(problems_file), "--split", "train", "--dev-size", "4"]
    synth += ["--output", str(data), "--batch-size", "3", "--max-new-tokens", "6", "--instruction", "think"]
    main([*synth, "--limit", "5"])
    first_run = completed_ids(data)
    assert first_run <= set(range(5)) and len(first_run) >= 3  # a response that is EOS at once is not written
    main(synth)  # resumes: only the missing problems are generated
    records = [json.loads(line) for line in data.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) and first_run < set(ids) <= set(range(8))
    first = records[0]
    assert first["prompt"] == [{"role": "user", "content": f"{QUESTIONS[0]}\nthink"}]
    assert first["completion"][0]["role"] == "assistant" and first["completion"][0]["content"]

    common = ["--model", str(model_dir), "--data", str(data), "--backbone", "cats", "--rank", "4", "--batch-size", "4"]
    common += ["--no-checkpoints", "--cpu"]
    main(["distill", *common, "--stage", "layerwise", "--epochs", "2", "--output", str(tmp_path / "lw")])
    main(["distill", *common, "--stage", "closed-form", "--output", str(tmp_path / "cf")])
    e2e = ["--stage", "e2e", "--epochs", "1", "--init", str(tmp_path / "cf"), "--output", str(tmp_path / "e2e")]
    main(["distill", *common, *e2e])

    for stage in ("lw", "cf", "e2e"):
        summary = json.loads((tmp_path / stage / "distill_summary.json").read_text())
        assert summary["seconds"] >= 0
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / stage)
        rights = [p for n, p in loaded.named_parameters() if "caprese_R" in n]
        assert rights and all(torch.count_nonzero(r) > 0 for r in rights)  # trained away from the zero init
    config = json.loads((tmp_path / "e2e" / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert config["stand_in_bits"] == 4  # CATS's default recipe carries the 4-bit stand-in through --init
    # data and backbone only: the best measured recipe, closed form with CATS's 4-bit stand-in
    main(["distill", *common, "--output", str(tmp_path / "default")])
    assert json.loads((tmp_path / "default" / "distill_summary.json").read_text())["stage"] == "closed-form"
    assert json.loads((tmp_path / "default" / "adapter_config.json").read_text())["stand_in_bits"] == 4


def test_distill_stand_in_default_follows_the_backbone():
    from caprese_peft.cli import build_adapter

    def bits(*flags: str) -> int | None:
        args = argparse.Namespace(init=None, layers="all", density=0.5, rank=2, stand_in_bits=None)
        for flag, value in zip(flags[::2], flags[1::2]):
            setattr(args, flag, value)
        return build_adapter(tiny_model("llama"), args).peft_config["default"].stand_in_bits

    assert bits("backbone", "cats") == 4
    assert bits("backbone", "griffin") == 4
    assert bits("backbone", "cats", "stand_in_bits", 0) is None
    assert bits("backbone", "griffin", "stand_in_bits", 3) == 3


def test_cli_reports_bad_input(tmp_path, problems_file):
    with pytest.raises(SystemExit, match="question field"):
        main(["synth", "--data", str(problems_file), "--question-field", "query", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        main(["distill", "--data", "x.jsonl", "--output", str(tmp_path / "o"), "--stage", "sgd"])
