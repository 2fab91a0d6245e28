"""Best-of-N coverage (section 4): pooled pass@k as a pure function, and `caprese-peft coverage` on a tiny model."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from peft import get_peft_model

from caprese_peft import CapreseConfig
from caprese_peft.cli import main
from caprese_peft.data import INSTRUCTION, generate_responses, user_message
from caprese_peft.eval.coverage import COVERAGE_FILES, pooled_coverage
from caprese_peft.eval.metrics import coverage_curve

from conftest import tiny_model, tiny_tokenizer

QUESTIONS = ["what is two plus three", "what is three plus two", "think what is five"]
FAST = ["--max-new-tokens", "3", "--batch-size", "6", "--split", "all"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_pooled_coverage_averages_independent_pools():
    correct = [
        [True, False, False, False, True, True],  # pools of 3: [T F F], [F T T]
        [False, False, False, False, False, True],  # [F F F], [F F T]
    ]
    mean, std = pooled_coverage(correct, 3)
    pools = [
        coverage_curve([row[:3] for row in correct], [1, 2, 3]),
        coverage_curve([row[3:] for row in correct], [1, 2, 3]),
    ]
    assert mean == pytest.approx([statistics.fmean(v) for v in zip(*pools)])
    assert std == pytest.approx([statistics.stdev(v) for v in zip(*pools)])
    assert mean[0] == pytest.approx((1 / 3 + 0 + 2 / 3 + 1 / 3) / 4)  # pass@1 is the fraction correct
    assert mean[-1] == pytest.approx((1 + 0 + 1 + 1) / 4)  # pass@N: any correct in the pool
    assert pooled_coverage(correct, 6)[1] == [0.0] * 6  # one pool: no spread
    with pytest.raises(ValueError, match="same whole number of pools of 4"):
        pooled_coverage(correct, 4)
    with pytest.raises(ValueError, match="same whole number"):
        pooled_coverage([[True, False], [True]], 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("coverage")
    tiny_model("llama").save_pretrained(root / "tiny")
    tiny_tokenizer(tuple(str(i) for i in range(80))).save_pretrained(root / "tiny")
    # the answers are the dense model's greedy responses (numbers: every token is one), so samples can be right
    model, tokenizer = tiny_model("llama"), tiny_tokenizer(tuple(str(i) for i in range(80)))
    greedy = generate_responses(model, tokenizer, [user_message(q, INSTRUCTION) for q in QUESTIONS], max_new_tokens=3)
    rows = [{"question": q, "answer": text} for q, (text, _) in zip(QUESTIONS, greedy)]
    (root / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    config = CapreseConfig(backbone="griffin", density=0.5, r=4, init_weights=False)
    get_peft_model(tiny_model("llama"), config).save_pretrained(root / "e2e")
    return root


def test_coverage_compares_dense_backbone_and_adapter_in_one_run(files):
    output = files / "out"
    main(["coverage", "--model", str(files / "tiny"), "--data", str(files / "math.jsonl"), "--output", str(output)]
         + ["--adapter", str(files / "e2e"), "--n", "3", "--pools", "2", "--temperature", "0.5", *FAST])  # fmt: skip
    assert sorted(p.name for p in output.iterdir()) == sorted(COVERAGE_FILES)
    results = json.loads((output / "results.json").read_text())
    assert (results["n"], results["pools"], results["problems"]) == (3, 2, 3)
    methods = results["methods"]
    assert list(methods) == ["dense", "backbone griffin 0.5", "e2e"]
    assert methods["dense"]["active_fraction"] == 1.0
    assert methods["backbone griffin 0.5"]["active_fraction"] < methods["e2e"]["active_fraction"] < 1.0
    for name, m in methods.items():
        assert m["ks"] == [1, 2, 3]
        assert m["relative_compute"] == pytest.approx([k * m["active_fraction"] for k in (1, 2, 3)])
        assert all(a <= b + 1e-12 for a, b in zip(m["coverage"], m["coverage"][1:])), name  # grows with k
        assert len(m["correct_per_problem"]) == 3 and all(0 <= c <= 6 for c in m["correct_per_problem"])
        assert m["coverage"][0] == pytest.approx(sum(m["correct_per_problem"]) / 18)  # pass@1: fraction correct
    assert any(m["coverage"][-1] > 0 for m in methods.values())  # the verifier found some right answers
    text = (output / "report.md").read_text()
    assert "| method | A (active fraction) | pass@1 | pass@2 | pass@3 |" in text and "| e2e | " in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0"], "n must be an integer >= 1, got 0"),
        (["--pools", "0"], "pools must be an integer >= 1"),
        (["--temperature", "0"], "temperature must be > 0"),
        (["--density", "1.5"], r"density must lie in \(0, 1\]"),
        (["--data", "missing.jsonl"], "No data file at"),
        (["--adapter", "nowhere"], "Cannot read the adapter"),
    ],
)
def test_coverage_bad_input_fails_before_work_and_writes_nothing(files, tmp_path, args, message):
    args = [str(files / a) if a.endswith((".jsonl", "nowhere")) else a for a in args]
    if "--data" not in args:
        args += ["--data", str(files / "math.jsonl")]
    with pytest.raises(SystemExit, match=message):
        main(["coverage", "--model", str(files / "tiny"), "--output", str(tmp_path / "out"), *FAST, *args])
    assert list(tmp_path.iterdir()) == []
