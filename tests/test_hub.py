"""Sharing adapters: loading by repo id from a Hugging Face cache offline, and push_to_hub through PEFT's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers.utils.hub as hf_hub_utils
from peft import get_peft_model

from caprese_peft import CapreseConfig

from conftest import random_prompts, tiny_model

REPO_ID = "caprese-test/tiny-llama-cats"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

LOAD_BY_REPO_ID = """
import sys, torch
sys.path.insert(0, {tests!r})
import caprese_peft
from peft import PeftModel
from conftest import random_prompts, tiny_model
model = PeftModel.from_pretrained(tiny_model("llama"), {repo!r})
ids, mask = random_prompts([6, 3])
out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
torch.save(out, {out!r})
"""


def test_adapter_loads_by_repo_id_from_an_offline_cache(tmp_path):
    model = get_peft_model(tiny_model("llama"), CapreseConfig(r=4, init_weights=False))
    ids, mask = random_prompts([6, 3])
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)

    # the layout huggingface_hub itself writes: models--{org}--{name}/snapshots/{commit}, refs/main -> commit
    repo_dir = tmp_path / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    model.save_pretrained(repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    script = LOAD_BY_REPO_ID.format(tests=str(Path(__file__).parent), repo=REPO_ID, out=str(tmp_path / "out.pt"))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)


def test_push_to_hub_uploads_a_standard_adapter_folder(monkeypatch):
    model = get_peft_model(tiny_model("llama"), CapreseConfig(backbone="griffin", r=4))
    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    def capture(self, folder, repo_id, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.listdir(folder))
        uploaded["config"] = json.loads(Path(folder, "adapter_config.json").read_text())

    monkeypatch.setattr(hf_hub_utils, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(type(model), "_upload_modified_files", capture)
    model.push_to_hub("someone/caprese-adapter")
    assert uploaded["repo_id"] == "someone/caprese-adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded["files"])
    assert uploaded["config"]["peft_type"] == "CAPRESE"
    assert uploaded["config"]["backbone"] == "griffin"
