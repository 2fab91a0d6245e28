"""Test-time density (appendix G): the context manager, and `caprese-peft sweep` end to end on a tiny model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import get_peft_model

from caprese_peft import CapreseConfig, parameter_report, test_time_density
from caprese_peft.cli import main
from caprese_peft.eval.sweep import SWEEP_FILES

from conftest import greedy, layers_of, random_prompts, tiny_model, tiny_tokenizer

QUESTIONS = ["what is two plus three", "what is three plus two", "think what is five"]
FAST = ["--max-new-tokens", "4", "--batch-size", "3", "--split", "all"]


pytestmark = pytest.mark.usefixtures("one_thread")


def caprese(backbone: str, density: float, base=None):
    torch.manual_seed(7)  # the same L and R for every density
    config = CapreseConfig(backbone=backbone, density=density, r=4, init_weights=False)
    return get_peft_model(base if base is not None else tiny_model("llama"), config)


def densities(model) -> set[float]:
    return {m.caprese_backbone["default"].density for m in layers_of(model)}


@pytest.mark.parametrize("backbone", ["cats", "griffin"])
def test_generation_at_a_test_time_density_equals_an_adapter_made_at_it(backbone):
    base = tiny_model("llama")
    trained = caprese(backbone, 0.5, copy.deepcopy(base))
    reference = caprese(backbone, 0.3, base)
    ids, mask = random_prompts([7, 4])

    with test_time_density(trained, 0.3) as model:
        assert model is trained and densities(trained) == {0.3}
        swept, _ = greedy(trained, ids, mask)
        swept_report = parameter_report(trained)
    want, _ = greedy(reference, ids, mask)
    assert torch.equal(swept, want)
    assert swept_report == parameter_report(reference)

    # restored afterwards, and the saved config keeps the trained density
    assert densities(trained) == {0.5} and trained.peft_config["default"].density == 0.5
    at_trained, _ = greedy(trained, ids, mask)
    assert not torch.equal(at_trained, want)


def test_density_is_restored_after_an_error_and_validated():
    model = caprese("cats", 0.5)
    with pytest.raises(RuntimeError, match="boom"), test_time_density(model, 0.8):
        assert densities(model) == {0.8}
        raise RuntimeError("boom")
    assert densities(model) == {0.5}
    for bad in (0, 0.0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"density must lie in \(0, 1\]"), test_time_density(model, bad):
            pass
    assert densities(model) == {0.5}
    unknown = r"No Caprese adapter named 'other'.*\['default'\]"
    with pytest.raises(ValueError, match=unknown), test_time_density(model, 0.4, adapter_name="other"):
        pass
    with pytest.raises(ValueError, match="has no Caprese layers"), test_time_density(tiny_model("llama"), 0.4):
        pass


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tiny_model("llama").save_pretrained(root / "tiny")
    tiny_tokenizer(tuple(str(i) for i in range(80))).save_pretrained(root / "tiny")
    rows = [{"question": q, "answer": f"#### {i}"} for i, q in enumerate(QUESTIONS)]
    (root / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "no_answers.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    caprese("cats", 0.5).save_pretrained(root / "e2e")
    foreign = get_peft_model(tiny_model("llama", hidden_size=64), CapreseConfig(r=4))
    foreign.save_pretrained(root / "foreign")
    return root


def test_sweep_writes_a_report_against_the_backbone_alone(files):
    output = files / "out"
    main(["sweep", "--model", str(files / "tiny"), "--data", str(files / "math.jsonl"), "--output", str(output)]
         + ["--adapter", str(files / "e2e"), "--densities", "0.7,0.3,0.7", *FAST])  # fmt: skip
    assert sorted(p.name for p in output.iterdir()) == sorted(SWEEP_FILES)
    assert [p.name for p in files.iterdir() if ".tmp-" in p.name] == []
    results = json.loads((output / "results.json").read_text())
    assert results["densities"] == [0.3, 0.7] and results["problems"] == 3
    methods = results["methods"]
    assert list(methods) == ["dense", "cats alone", "e2e (trained at 0.5)"]
    dense, alone, adapter = methods.values()
    assert [p["density"] for p in alone["points"]] == [p["density"] for p in adapter["points"]] == [0.3, 0.7]
    assert dense["points"][0]["kl"] == 0.0 and dense["points"][0]["active_fraction"] == 1.0
    for method in (alone, adapter):
        low, high = method["points"]
        assert low["active_params"] < high["active_params"] < dense["points"][0]["active_params"]
        assert low["kl"] > 0 and high["kl"] > 0 and 0.0 <= low["accuracy"] <= 1.0
    assert adapter["points"][0]["kl"] != alone["points"][0]["kl"]  # the correction is in use
    assert adapter["config"]["density"] == 0.5  # what it was trained at
    text = (output / "report.md").read_text()
    assert "| e2e (trained at 0.5) | 0.3 |" in text and "| cats alone | 0.7 |" in text
    assert all((output / n).read_bytes()[:4] == b"\x89PNG" for n in ("accuracy.png", "kl.png"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--densities", "0.3,1.5"], r"density must lie in \(0, 1\] .*got 1.5"),
        (["--densities", "0"], r"density must lie in \(0, 1\] .*got 0.0"),
        (["--densities", "half"], "--densities takes comma-separated numbers"),
        (["--data", "no_answers.jsonl"], "has no answer"),
        (["--data", "missing.jsonl"], "No data file at"),
        (["--adapter", "foreign"], "does not fit the model: .*hidden_size=64"),
        (["--adapter", "nowhere"], "Cannot read the adapter"),
    ],
)
def test_sweep_bad_input_fails_before_work_and_writes_nothing(files, tmp_path, args, message):
    args = [str(files / a) if a.endswith((".jsonl", "foreign", "nowhere")) else a for a in args]
    if "--data" not in args:
        args += ["--data", str(files / "math.jsonl")]
    with pytest.raises(SystemExit, match=message):
        main(["sweep", "--model", str(files / "tiny"), "--output", str(tmp_path / "out"), *FAST, *args])
    assert list(tmp_path.iterdir()) == []
