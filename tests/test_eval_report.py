"""`caprese-peft eval` end to end on a tiny model: one report comparing dense, backbone and adapter; bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import peft.peft_model
import pytest
import torch
from peft import LoraConfig, get_peft_model

from caprese_peft import CapreseConfig
from caprese_peft.cli import main
from caprese_peft.data import INSTRUCTION, load_eval_problems, user_message
from caprese_peft.eval import evaluate
from caprese_peft.eval.latency import device_name
from caprese_peft.eval.methods import method_model, plan_methods
from caprese_peft.eval.metrics import check_answer
from caprese_peft.eval.report import REPORT_FILES, write_report
from caprese_peft.loading import load_model

from conftest import tiny_model, tiny_tokenizer

QUESTIONS = ["what is two plus three", "what is three plus two", "what is five plus two", "think what is five"]
METHOD_KEYS = {
    "kind", "source", "config", "accuracy", "correct", "length", "lengths", "kl", "perplexity", "agreement",
    "samples", "latency", "total_params", "active_params", "adapter_params",
}  # fmt: skip
FAST = ["--max-new-tokens", "6", "--batch-size", "3", "--timing-tokens", "3", "--timing-repeats", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny llama + tokenizer folder (every model id decodes to a number), data files and three adapters."""
    root = tmp_path_factory.mktemp("eval")
    tiny_model("llama").save_pretrained(root / "tiny")
    tiny_tokenizer(tuple(str(i) for i in range(80))).save_pretrained(root / "tiny")
    rows = [{"question": q, "answer": f"#### {i}"} for i, q in enumerate(QUESTIONS)]
    (root / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "no_answers.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))

    trained = get_peft_model(tiny_model("llama"), CapreseConfig(backbone="cats", density=0.5, r=4, init_weights=False))
    trained.save_pretrained(root / "random-R")  # R != 0: must differ from the backbone alone
    foreign = get_peft_model(tiny_model("llama", hidden_size=64), CapreseConfig(r=4))
    foreign.save_pretrained(root / "foreign")  # made for a base model with another hidden size
    get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / "lora")
    return root


def run_eval(files, output, *extra: str) -> dict:
    main(["eval", "--model", str(files / "tiny"), "--output", str(output), *FAST, *extra])
    return json.loads((output / "results.json").read_text())


@pytest.fixture(scope="module")
def report(files):
    """One invocation: dense, the CATS backbone from the flags and the random-R adapter, on 4 GSM8K-style problems."""
    output = files / "out"
    data = ["--data", str(files / "math.jsonl"), "--split", "all"]
    results = run_eval(
        files, output, *data, "--adapter", str(files / "random-R"), "--backbone", "cats", "--density", "0.5"
    )
    return output, results


def test_one_invocation_writes_a_complete_report(files, report):
    output, results = report
    assert sorted(p.name for p in output.iterdir()) == sorted(REPORT_FILES)
    assert [p.name for p in files.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
    methods = results["methods"]
    assert list(methods) == ["dense", "backbone cats 0.5", "random-R"]
    assert [m["kind"] for m in methods.values()] == ["dense", "backbone", "adapter"]
    assert results["problems"] == 4 and results["kl_on"] == "greedy responses of the dense model"
    for name, method in methods.items():
        assert set(method) == METHOD_KEYS, name
        assert len(method["samples"]) == len(method["lengths"]) == 4
        assert 0.0 <= method["accuracy"] <= 1.0 and method["correct"] == sum(s["correct"] for s in method["samples"])
        assert all(1 <= n <= 6 for n in method["lengths"]) and method["length"]["count"] == 4
        assert method["latency"]["ttft_ms"] > 0 and method["latency"]["new_tokens"] == 3
        assert method["perplexity"] > 0

    dense, backbone, adapter = methods.values()
    assert dense["kl"] == 0.0
    assert [s["agreement"] for s in dense["samples"]] == dense["lengths"]  # dense agrees with itself throughout
    assert dense["agreement"]["full"] == 1.0
    assert dense["perplexity"] != backbone["perplexity"]
    assert backbone["kl"] > 0 and adapter["kl"] > 0 and adapter["kl"] != backbone["kl"]
    assert dense["active_params"] == dense["total_params"] and dense["adapter_params"] == 0
    assert backbone["adapter_params"] == 0 and backbone["active_params"] < backbone["total_params"]
    assert adapter["adapter_params"] == 4 * 2 * 4 * 48  # 4 layers of L (48 x 4) and R (4 x 48)
    assert adapter["active_params"] == backbone["active_params"] + adapter["adapter_params"]
    assert adapter["config"] == {"backbone": "cats", "density": 0.5, "layers": "all", "r": 4}

    text = (output / "report.md").read_text()
    assert "| method | accuracy | mean response length | KL(dense‖model) | perplexity | agreement length" in text
    assert all(f"| {name} | " in text for name in methods)
    assert all((output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in ("lengths.png", "scores.png"))


def test_completions_in_the_data_and_the_adapters_own_backbone(files, report, tmp_path):
    dense = report[1]["methods"]["dense"]
    # answers built from the dense responses (numbers), so that accuracy has something to find
    records = [
        {
            "id": i,
            "prompt": user_message(q, INSTRUCTION),
            "completion": [{"role": "assistant", "content": "the answer is five"}],
            "answer": f"#### {sample['response'].split()[-1] if sample['response'] else 99}",
        }
        for i, (q, sample) in enumerate(zip(QUESTIONS, dense["samples"]))
    ]
    data = tmp_path / "synth.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = run_eval(
        files, tmp_path / "out", "--data", str(data), "--split", "all", "--adapter", str(files / "random-R")
    )

    methods = results["methods"]
    assert list(methods) == ["dense", "backbone cats 0.5", "random-R"]  # the backbone from the adapter's config
    assert results["kl_on"] == "completions in the data"
    expected = sum(check_answer(s["response"], r["answer"]) for s, r in zip(dense["samples"], records))
    assert expected >= 1 and methods["dense"]["correct"] == expected
    assert [s["response"] for s in methods["dense"]["samples"]] == [s["response"] for s in dense["samples"]]
    assert methods["random-R"]["kl"] != methods["backbone cats 0.5"]["kl"]


def test_fast_decode_gives_the_same_responses_and_kl_problems_scores_a_prefix(files, report, tmp_path):
    data = ["--data", str(files / "math.jsonl"), "--split", "all", "--backbone", "cats", "--density", "0.5"]
    results = run_eval(
        files, tmp_path / "out", *data, "--adapter", str(files / "random-R"), "--fast-decode", "--kl-problems", "2"
    )
    full = report[1]
    assert results["decoder"] == "FastDecoder" and full["decoder"] == "generate"
    for name, method in results["methods"].items():
        assert [s["response"] for s in method["samples"]] == [s["response"] for s in full["methods"][name]["samples"]]
        assert method["lengths"] == full["methods"][name]["lengths"]
    # KL on the dense responses of the first two problems only (their tokens, the EOS left out)
    lengths = full["methods"]["dense"]["lengths"]
    assert results["kl_problems"] == 2
    assert (
        sum(lengths[:2]) - 2 <= results["kl_tokens"] <= sum(lengths[:2]) and results["kl_tokens"] < full["kl_tokens"]
    )
    assert results["methods"]["random-R"]["kl"] > 0
    assert "of the first 2 problems" in (tmp_path / "out" / "report.md").read_text()


def test_kl_does_not_depend_on_the_order_of_the_plan(files, report, monkeypatch):
    plan = evaluate.plan_methods

    def dense_last(*args):
        methods = plan(*args)
        return {name: methods[name] for name in [*list(methods)[1:], "dense"]}

    monkeypatch.setattr(evaluate, "plan_methods", dense_last)
    model, tokenizer = load_model(str(files / "tiny"))
    problems = load_eval_problems(files / "math.jsonl", split="all")
    fast = {"max_new_tokens": 6, "batch_size": 3, "timing_tokens": 3, "timing_repeats": 1, "progress": False}
    adapters = [files / "random-R"]
    results = evaluate.evaluate_methods(
        model, tokenizer, problems, adapters=adapters, backbone="cats", density=0.5, **fast
    )
    assert list(results["methods"]) == ["backbone cats 0.5", "random-R", "dense"]
    expected = report[1]["methods"]  # the same run with dense first
    for name, method in results["methods"].items():
        assert method["kl"] is not None and method["kl"] == pytest.approx(expected[name]["kl"]), name
        assert method["perplexity"] == pytest.approx(expected[name]["perplexity"]), name
        assert method["lengths"] == expected[name]["lengths"], name


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-answers", r"Record 0 of .* has no answer .* found fields \['question'\]"),
        ("missing-data", "No data file at"),
        ("density-high", r"density must lie in \(0, 1\] .*got 1.5"),
        ("density-zero", r"density must lie in \(0, 1\] .*got 0.0"),
        ("foreign-adapter", "does not fit the model: .*hidden_size=64"),
        ("lora-adapter", "is a LORA adapter, not a Caprese one"),
        ("missing-adapter", "Cannot read the adapter"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(files, tmp_path, case, message):
    args = {
        "no-answers": ["--data", str(files / "no_answers.jsonl")],
        "missing-data": ["--data", str(files / "missing.jsonl")],
        "density-high": ["--density", "1.5"],
        "density-zero": ["--density", "0"],
        "foreign-adapter": ["--adapter", str(files / "foreign")],
        "lora-adapter": ["--adapter", str(files / "lora")],
        "missing-adapter": ["--adapter", str(files / "nowhere")],
    }[case]
    if "--data" not in args:
        args += ["--data", str(files / "math.jsonl")]
    with pytest.raises(SystemExit, match=message):
        main(
            ["eval", "--model", str(files / "tiny"), "--split", "all", "--output", str(tmp_path / "out"), *FAST, *args]
        )
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary folder


def test_plan_checks_each_adapter_without_reading_its_weights(files, monkeypatch):
    reads = []
    load = peft.peft_model.load_peft_weights
    monkeypatch.setattr(peft.peft_model, "load_peft_weights", lambda *a, **k: reads.append(a[0]) or load(*a, **k))
    base = tiny_model("llama")
    methods = plan_methods(base, [files / "random-R"], None, None, None)
    assert list(methods) == ["dense", "backbone cats 0.5", "random-R"] and reads == []
    with method_model(base, methods["random-R"]) as runner:
        assert reads == [str(files / "random-R")]  # read once, when the method runs
        assert any(torch.count_nonzero(p) for n, p in runner.named_parameters() if "caprese_R" in n)
    assert not hasattr(base, "peft_config")  # unwrapped again
    with pytest.raises(ValueError, match="does not fit the model: .*hidden_size=64"):
        plan_methods(base, [files / "random-R", files / "foreign"], None, None, None)  # still fails at once
    assert len(reads) == 1 and not hasattr(base, "peft_config")


def test_device_name_names_a_gpu(monkeypatch):
    # the CUDA branch, checked on a CPU: eval, sweep and coverage name the device at the end of every run
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Fake GPU at {device}")
    assert device_name(torch.device("cuda", 0)) == "Fake GPU at cuda:0"
    assert device_name(torch.device("cpu")) == "cpu (1 thread)"  # the module runs on one thread


def test_existing_output_needs_overwrite(report, tmp_path):
    output, results = report
    with pytest.raises(SystemExit, match="exists and is not empty; .* --overwrite"):
        main(["eval", "--output", str(output), "--data", "missing.jsonl"])  # refused before anything else
    target = tmp_path / "again"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="not empty"):
        write_report(results, target)
    write_report(results, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(REPORT_FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_importing_the_package_stays_light():
    code = "import sys, caprese_peft, caprese_peft.cli, caprese_peft.eval.report; "
    code += "print(sorted({'datasets', 'trl', 'matplotlib', 'math_verify'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
