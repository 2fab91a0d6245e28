"""The model card of a Caprese adapter: written by save_pretrained and push_to_hub, updated by the commands."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import transformers.utils.hub as hf_hub_utils
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

from caprese_peft import CapreseConfig, update_model_card
from caprese_peft.cli import main
from caprese_peft.data import INSTRUCTION, user_message
from caprese_peft.model_card import BEGIN, END, write_model_card
from caprese_peft.registration import hook_model_card

from conftest import tiny_model, tiny_tokenizer

# PEFT looks the (made-up) base model name up to check its vocabulary; offline it only warns
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Could not find a config file in org/tiny-llama"),
]
QUESTIONS = ["what is two plus three", "what is three plus two", "think what is five"]


def griffin_model(name: str = "org/tiny-llama"):
    base = tiny_model("llama")
    base.config._name_or_path = base.name_or_path = name  # what from_pretrained(name) would set
    config = CapreseConfig(backbone="griffin", density=0.4, r=4, layers_to_transform=[0, 1])
    return get_peft_model(base, config)


def load(folder) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_save_pretrained_writes_a_hub_model_card(tmp_path):
    model = griffin_model()
    update_model_card(model, training_data=["openai/gsm8k", "out/synth.jsonl"], training={"stage": "e2e", "epochs": 3})
    model.save_pretrained(tmp_path)
    card = load(tmp_path)
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-llama" and data["library_name"] == "peft"
    assert {"caprese", "caprese-griffin", "base_model:adapter:org/tiny-llama"} <= set(data["tags"])
    assert data["pipeline_tag"] == "text-generation"
    assert data["datasets"] == ["openai/gsm8k"]  # Hub ids only; the local file is named in the body
    assert data["caprese"]["training_data"] == ["openai/gsm8k", "synth.jsonl"]  # a path that is not here: its name
    assert data["caprese"]["adapter_params"] == 2 * 2 * 48 * 4 and data["caprese"]["blocks"] == 2
    text = card.text
    for expected in (
        "| base model | `org/tiny-llama` |",
        "| backbone | GRIFFIN",
        "| density | 0.4 of",
        "| rank r | 4 ",
        "| target layers | decoder layers 0, 1 |",
        "| training data | `openai/gsm8k`, `synth.jsonl` |",
        "| training | stage e2e, epochs 3 |",
        "import caprese_peft",
        "- PEFT ",  # PEFT's own update ran on our card
    ):
        assert expected in text, expected
    assert text.count(BEGIN) == text.count(END) == 1


def test_figures_recorded_on_a_folder_and_kept_across_saves(tmp_path):
    model = griffin_model()
    model.save_pretrained(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text() + "\nNotes the user wrote.\n")
    baselines = {"dense": {"accuracy": 0.5}, "griffin 0.4 alone": {"accuracy": 0.25, "kl": 0.2}}
    update_model_card(tmp_path, metrics={"accuracy": 0.375, "kl": 0.0512}, dataset="gsm8k dev", baselines=baselines)
    update_model_card(tmp_path, metrics={"accuracy": 0.4, "kl": 0.05}, dataset="gsm8k dev", notes="greedy")  # replaces
    update_model_card(tmp_path, metrics={"accuracy": 0.1}, dataset="math-500")
    model.save_pretrained(tmp_path)  # saving again keeps what was recorded and the user's text

    card = load(tmp_path)
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("gsm8k dev", "accuracy"): 0.4, ("gsm8k dev", "kl"): 0.05, ("math-500", "accuracy"): 0.1}
    assert card.data.model_name == tmp_path.name
    text = card.text
    assert "On `gsm8k dev` (greedy):" in text and "| this adapter | 40.0% | 0.05 |" in text
    assert "| dense |" not in text  # the newer gsm8k measurement came without baselines
    assert "On `math-500`:" in text and "| this adapter | 10.0% |" in text
    assert text.count(BEGIN) == 1 and "Notes the user wrote." in text


def test_other_peft_methods_keep_peft_s_card(tmp_path):
    get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    card = load(tmp_path)
    assert "caprese" not in (card.data.tags or []) and BEGIN not in card.text
    assert card.data.library_name == "peft"
    with pytest.raises(ValueError, match="LORA adapter, not a Caprese one"):
        update_model_card(tmp_path, training_data="x")


def test_hook_is_installed_once():
    hooked = PeftModel.create_or_update_model_card
    assert hooked.__caprese__
    hook_model_card(write_model_card)
    assert PeftModel.create_or_update_model_card is hooked


def test_update_model_card_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        update_model_card(tmp_path / "nowhere", training_data="x")
    with pytest.raises(ValueError, match="Caprese adapter"):
        update_model_card(tiny_model("llama"), training_data="x")
    model = griffin_model()
    with pytest.raises(ValueError, match="needs the dataset"):
        update_model_card(model, metrics={"accuracy": 0.5})
    with pytest.raises(ValueError, match="map names to numbers"):
        update_model_card(model, metrics={"accuracy": "high"}, dataset="d")
    with pytest.raises(ValueError, match="pass metrics"):
        update_model_card(model, dataset="d")


class FakeApi:
    """Stands in for the Hub: a new repo without a card, and a commit whose files are captured."""

    def __init__(self):
        self.files = {}

    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                self.files[op.path_in_repo] = f.read()


def test_push_to_hub_uploads_the_caprese_card(monkeypatch):
    # transformers' push_to_hub replaces README.md after save_pretrained: the hook must put the card back
    api = FakeApi()
    monkeypatch.setattr(hf_hub_utils, "hf_api", lambda: api)
    model = griffin_model()
    update_model_card(model, training_data="openai/gsm8k")
    model.push_to_hub("someone/caprese-adapter", tags=["math"])
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(api.files)
    card = ModelCard(api.files["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-llama"
    assert {"caprese", "caprese-griffin", "math"} <= set(card.data.tags)
    assert "| backbone | GRIFFIN" in card.text and "`openai/gsm8k`" in card.text
    assert "automatically generated" not in card.text


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    tiny_model("llama").save_pretrained(root / "tiny")
    tiny_tokenizer(tuple(str(i) for i in range(80))).save_pretrained(root / "tiny")
    records = [
        {
            "id": i,
            "prompt": user_message(q, INSTRUCTION),
            "completion": [{"role": "assistant", "content": "the answer is 5"}],
            "answer": "#### 5",
        }
        for i, q in enumerate(QUESTIONS)
    ]
    (root / "synth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_distill_then_eval_record_training_data_and_figures(files):
    adapter = files / "cf"
    main(["distill", "--model", str(files / "tiny"), "--data", str(files / "synth.jsonl"), "--stage", "closed-form"]
         + ["--rank", "4", "--batch-size", "3", "--output", str(adapter)])  # fmt: skip
    card = load(adapter)
    data = files / "synth.jsonl"
    digest = hashlib.sha256(data.read_bytes()).hexdigest()[:12]
    identity = f"synth.jsonl ({data.stat().st_size:,} bytes, sha256 {digest})"  # the file, not where it lies
    assert card.data.to_dict()["caprese"]["training_data"] == [identity]
    assert card.data.to_dict()["caprese"]["training"]["stage"] == "closed-form"
    assert f"| training data | `{identity}` |" in card.text

    fast = ["--max-new-tokens", "3", "--batch-size", "3", "--timing-tokens", "2", "--timing-repeats", "1"]
    main(["eval", "--model", str(files / "tiny"), "--data", str(files / "synth.jsonl"), "--split", "all", *fast]
         + ["--adapter", str(adapter), "--output", str(files / "eval"), "--card"])  # fmt: skip
    results = json.loads((files / "eval" / "results.json").read_text())
    card = load(adapter)
    figures = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert figures["accuracy"] == results["methods"]["cf"]["accuracy"]
    assert figures["kl"] == pytest.approx(results["methods"]["cf"]["kl"])
    assert {"mean_length", "perplexity", "agreement_length", "active_fraction", "ttnt_ms"} <= set(figures)
    assert "| dense |" in card.text and "| backbone cats 0.5 |" in card.text  # baselines of the same run
    assert card.data.to_dict()["caprese"]["training_data"] == [identity]  # still there
    # what the card says of data and figures names no folder of this machine (the base model is PEFT's
    # base_model_name_or_path: a local folder here because the test loads one, a Hub id for the packaged SmolLM2)
    assert str(files) not in json.dumps(card.data.to_dict()["caprese"])
    assert [line for line in card.text.splitlines() if str(files) in line] == [f"| base model | `{files / 'tiny'}` |"]

    # an adapter trained further from this one names it the same way
    main(["distill", "--model", str(files / "tiny"), "--data", str(data), "--stage", "closed-form", "--init", str(adapter)]
         + ["--batch-size", "3", "--output", str(files / "again")])  # fmt: skip
    init = load(files / "again").data.to_dict()["caprese"]["training"]["init"]
    assert init.startswith("cf/ (") and str(files) not in init


def test_eval_card_needs_local_adapter_folders(files, tmp_path):
    with pytest.raises(SystemExit, match="--card records figures .* pass --adapter"):
        main(["eval", "--model", str(files / "tiny"), "--data", str(files / "synth.jsonl"), "--split", "all"]
             + ["--output", str(tmp_path / "out"), "--card"])  # fmt: skip
    with pytest.raises(SystemExit, match="not a local adapter folder"):
        main(["eval", "--model", str(files / "tiny"), "--data", str(files / "synth.jsonl"), "--split", "all"]
             + ["--output", str(tmp_path / "out"), "--card", "--adapter", "someone/remote"])  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    assert not os.path.exists(files / "someone")
