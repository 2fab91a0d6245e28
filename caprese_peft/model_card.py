"""The model card (README.md) of a Caprese adapter, in the Hugging Face Hub's format.

``save_pretrained`` and ``push_to_hub`` of a PEFT model with a Caprese adapter write it (the hook that
makes PEFT call ``write_model_card`` lives in ``registration.py``); ``update_model_card`` records the
training data and measured figures, on a saved adapter folder or on a model before it is saved.

What the card holds: YAML metadata (``base_model``, ``library_name: peft``, ``tags`` with ``caprese``,
``pipeline_tag``, ``datasets`` for training data on the Hub, ``model-index`` for measured figures, and a
``caprese`` block with what was recorded) and a body section between two HTML comments, rendered anew
from the adapter config and that block on every write, so text a user adds around it is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .registration import CAPRESE

CARD_FILE = "README.md"
META_KEY = "caprese"
BEGIN = "<!-- caprese:begin -->"
END = "<!-- caprese:end -->"
# the card transformers writes when push_to_hub finds no README.md in the repo: ours replaces it
_TRANSFORMERS_TEMPLATE = "This model card has been automatically generated."
_RECORDED_ON_MODEL = "_caprese_card_info"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")


def _is_hub_dataset(name: str) -> bool:
    # a Hub id looks like "owner/name"; a local file has a data suffix or exists here
    return bool(_HUB_ID.match(name)) and not name.endswith(_FILE_SUFFIXES) and not Path(name).exists()


def describe_source(source: str | os.PathLike) -> str:
    """What identifies a data set or an adapter in a card that may be published, without exposing this machine.

    A Hub id stays as it is; an existing local file becomes its name, size and content hash (``synth.jsonl
    (1,234 bytes, sha256 0123456789ab)``), a local folder its name and a hash of its files; any other path only its
    name. A card written by ``save_pretrained`` is what ``push_to_hub`` publishes, so no directory goes into it.
    """
    name = str(source)
    path = Path(name)
    if _is_hub_dataset(name):
        return name
    if path.is_file():
        return f"{path.name} ({path.stat().st_size:,} bytes, sha256 {_sha256([path])})"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return f"{path.resolve().name}/ ({len(files)} files, sha256 {_sha256(files, root=path)})"
    return path.name or name


def _sha256(files: Sequence[Path], root: Path | None = None) -> str:
    """The first 12 hex digits of a SHA-256 over the files' contents (and, under ``root``, their relative names)."""
    digest = hashlib.sha256()
    for file in files:
        if root is not None:
            digest.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def _caprese_config(model: Any) -> tuple[str, Any] | None:
    """``(adapter name, config)`` of the model's active Caprese adapter, else of its first; None without one."""
    configs = getattr(model, "peft_config", None) or {}
    caprese = {name: c for name, c in configs.items() if getattr(c, "peft_type", None) == CAPRESE}
    if not caprese:
        return None
    active = getattr(model, "active_adapter", None)
    name = active if active in caprese else next(iter(caprese))
    return name, caprese[name]


def is_caprese_model(model: Any) -> bool:
    """Whether ``model`` (a PEFT model) holds a Caprese adapter."""
    return _caprese_config(model) is not None


def _merge(recorded: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(recorded)
    if update.get("training_data"):
        merged["training_data"] = list(update["training_data"])
    if update.get("training"):
        merged["training"] = {**merged.get("training", {}), **update["training"]}
    for evaluation in update.get("evaluations", []):
        # one entry per dataset: a new measurement on the same data replaces the old one
        kept = [e for e in merged.get("evaluations", []) if e.get("dataset") != evaluation.get("dataset")]
        merged["evaluations"] = [*kept, evaluation]
    for key in ("blocks", "adapter_params"):
        if key in update:
            merged[key] = update[key]
    return merged


def _recording(
    training_data: str | os.PathLike | Sequence[str | os.PathLike] | None,
    training: Mapping[str, Any] | None,
    metrics: Mapping[str, float] | None,
    dataset: str | None,
    baselines: Mapping[str, Mapping[str, float]] | None,
    notes: str | None,
) -> dict[str, Any]:
    update: dict[str, Any] = {}
    if training_data is not None:
        items = [training_data] if isinstance(training_data, (str, os.PathLike)) else list(training_data)
        if not items or not all(isinstance(i, (str, os.PathLike)) and str(i) for i in items):
            raise ValueError(
                f"training_data must be a dataset name or path, or a list of them; got {training_data!r}."
            )
        update["training_data"] = [describe_source(i) for i in items]
    if training is not None:
        if not isinstance(training, Mapping):
            raise ValueError(f"training must be a mapping (e.g. {{'stage': 'e2e', 'epochs': 3}}), got {training!r}.")
        record = dict(training)
        if record.get("init"):  # the adapter training started from, as the card of a published one may name it
            record["init"] = describe_source(record["init"])
        update["training"] = json.loads(json.dumps(record, default=str))  # plain YAML-safe values
    if metrics is not None or baselines is not None:
        if not metrics:
            raise ValueError(
                "metrics must name at least one figure measured for this adapter, e.g. {'accuracy': 0.3}."
            )
        if not dataset:
            raise ValueError("Recording metrics needs the dataset they were measured on (dataset=...).")
        for owner, values in {
            "metrics": metrics,
            **{f"baselines[{k!r}]": v for k, v in (baselines or {}).items()},
        }.items():
            bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
            if bad:
                raise ValueError(f"{owner} must map names to numbers; got {bad}.")
        evaluation: dict[str, Any] = {"dataset": str(dataset), "metrics": {k: float(v) for k, v in metrics.items()}}
        if baselines:
            evaluation["baselines"] = {n: {k: float(v) for k, v in m.items()} for n, m in baselines.items()}
        if notes:
            evaluation["notes"] = str(notes)
        update["evaluations"] = [evaluation]
    elif dataset is not None or notes is not None:
        raise ValueError("dataset and notes describe measured figures: pass metrics=... with them.")
    return update


def update_model_card(
    target: Any,
    *,
    training_data: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    dataset: str | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    notes: str | None = None,
) -> Any:
    """Record training data and measured figures in a Caprese adapter's model card.

    Args:
        target: a saved adapter folder (its README.md is rewritten now) or a PEFT model with a Caprese
            adapter (what is recorded goes into the card its next ``save_pretrained``/``push_to_hub`` writes).
        training_data: the data the adapter was distilled on: Hub dataset ids (also listed under the
            card's ``datasets``) or local paths.
        training: the training procedure, e.g. ``{"stage": "e2e", "epochs": 3, "learning_rate": 2e-5}``.
        metrics: figures measured for this adapter, e.g. ``{"accuracy": 0.31, "kl": 0.05}``; they go into the
            body and the ``model-index`` metadata. Needs ``dataset``.
        dataset: what the figures were measured on, e.g. ``"gsm8k dev (500 problems)"``; a new measurement
            on the same dataset replaces the old one.
        baselines: the same figures for methods to compare with, e.g. ``{"dense": {...}, "cats 0.5": {...}}``.
        notes: how they were measured, e.g. ``"greedy, 256 new tokens"``.

    Returns the README path for a folder, else the model.
    """
    update = _recording(training_data, training, metrics, dataset, baselines, notes)
    if isinstance(target, (str, os.PathLike)):
        folder = Path(target)
        config_file = folder / "adapter_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} holds no adapter_config.json: pass a saved Caprese adapter folder.")
        config = json.loads(config_file.read_text())
        if config.get("peft_type") != CAPRESE.value:
            raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter, not a Caprese one.")
        return _write(folder, config, update, base_model=config.get("base_model_name_or_path"))
    if not is_caprese_model(target):
        raise ValueError(
            f"update_model_card takes a saved Caprese adapter folder or a PEFT model with a Caprese adapter; got "
            f"{type(target).__name__}."
        )
    object.__setattr__(target, _RECORDED_ON_MODEL, _merge(getattr(target, _RECORDED_ON_MODEL, {}), update))
    return target


def write_model_card(model: Any, output_dir: str | os.PathLike, peft_update: Any = None) -> Path:
    """Write (or update) the card of ``model``'s Caprese adapter in ``output_dir``; called from ``save_pretrained``.

    ``peft_update`` is PEFT's own card update (library, tags, base model, PEFT version), run on our card.
    """
    from .accounting import parameter_report
    from .layer import CapreseLayer

    folder = Path(output_dir)
    path = folder / CARD_FILE
    _, config = _caprese_config(model)
    update = dict(getattr(model, _RECORDED_ON_MODEL, {}))
    update["blocks"] = sum(isinstance(m, CapreseLayer) for m in model.modules())
    if update["blocks"]:
        update["adapter_params"] = parameter_report(model).adapter
    carried_tags: list[str] = []
    if path.is_file():
        existing = path.read_text()
        if BEGIN not in existing and _TRANSFORMERS_TEMPLATE in existing:
            # push_to_hub's stand-in card for a repo without one: start from ours, keep the tags it was given
            from huggingface_hub import ModelCard

            carried_tags = [t for t in (ModelCard(existing).data.tags or []) if t != "transformers"]
            path.unlink()
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(f"---\nlibrary_name: peft\n---\n\n{BEGIN}\n{END}\n")
    if peft_update is not None:
        peft_update()
    base_model = getattr(config, "base_model_name_or_path", None)
    return _write(folder, config.to_dict(), update, base_model=base_model, extra_tags=carried_tags)


def _write(
    folder: Path,
    config: Mapping[str, Any],
    update: Mapping[str, Any],
    *,
    base_model: str | None,
    extra_tags: Sequence[str] = (),
) -> Path:
    from huggingface_hub import EvalResult, ModelCard

    path = folder / CARD_FILE
    card = (
        ModelCard(path.read_text())
        if path.is_file()
        else ModelCard(f"---\nlibrary_name: peft\n---\n\n{BEGIN}\n{END}\n")
    )
    data = card.data
    recorded = _merge(data.get(META_KEY) or {}, update)
    data[META_KEY] = recorded
    data["library_name"] = "peft"
    if not data.get("base_model") and base_model:
        data["base_model"] = base_model
    if not data.get("base_model"):  # a model built from a config has no name: PEFT writes an empty one
        data.pop("base_model", None)
    backbone = config.get("backbone", "?")
    tags = [t for t in data.get("tags") or [] if t != "base_model:adapter:"]  # PEFT's tag for a nameless base
    for tag in ("caprese", f"caprese-{backbone}", *extra_tags):
        if tag not in tags:
            tags.append(tag)
    data["tags"] = tags
    if not data.get("pipeline_tag"):
        data["pipeline_tag"] = "text-generation"
    hub_datasets = [d for d in recorded.get("training_data", []) if _is_hub_dataset(d)]
    if hub_datasets:
        data["datasets"] = sorted(set(data.get("datasets") or []) | set(hub_datasets))
    evaluations = recorded.get("evaluations", [])
    if evaluations:
        data.model_name = data.model_name or folder.resolve().name
        data.eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=e["dataset"],
                dataset_name=e["dataset"],
                metric_type=name,
                metric_value=value,
            )
            for e in evaluations
            for name, value in e["metrics"].items()
        ]
    section = render_section(config, recorded, data.get("base_model"))
    text = card.text
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text, tail = head + section, rest.split(END, 1)[1].lstrip("\n")
    else:
        tail = text.lstrip("\n")
        text = section
    card.text = text + ("\n\n" + tail if tail.strip() else "\n")
    card.save(path)
    return path


def _layers(config: Mapping[str, Any]) -> str:
    layers = config.get("layers_to_transform")
    if layers is None:
        return "all decoder layers"
    return "decoder layers " + ", ".join(str(i) for i in layers)


def _figure(value: float, name: str) -> str:
    if name in ("accuracy", "agreement_full", "active_fraction") or name.startswith("pass@"):
        return f"{value:.1%}"
    return f"{value:.4g}"


def render_section(config: Mapping[str, Any], recorded: Mapping[str, Any], base_model: str | None) -> str:
    """The card's body section: what the adapter is, how to load it, what it was trained on, what it measured."""
    backbone = str(config.get("backbone", "?"))
    density = config.get("density")
    base = f"`{base_model}`" if base_model else "(not recorded)"
    targets = config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, (list, set, tuple)) else targets
    rows = [
        ("base model", base),
        ("backbone", f"{backbone.upper()} (sparse feed-forward for generated tokens)"),
        ("density", f"{density:g} of the feed-forward neurons per generated token (trained at this density)"),
        ("rank r", f"{config.get('r')} (correction `x @ L @ R` beside each feed-forward block)"),
        *(
            [
                (
                    "stand-in",
                    f"the dropped neurons computed from {config['stand_in_bits']}-bit copies of their weights, "
                    "made from the base model's at load (not in this repo)",
                )
            ]
            if config.get("stand_in_bits")
            else []
        ),
        ("target layers", _layers(config)),
        ("target modules", f"`{targets}`" if targets else "default (`mlp`)"),
    ]
    if recorded.get("blocks"):
        rows.append(("wrapped blocks", str(recorded["blocks"])))
    if recorded.get("adapter_params"):
        rows.append(("added parameters", f"{recorded['adapter_params']:,}"))
    data = recorded.get("training_data")
    rows.append(("training data", ", ".join(f"`{d}`" for d in data) if data else "not recorded"))
    if recorded.get("training"):
        rows.append(("training", ", ".join(f"{k} {v}" for k, v in recorded["training"].items())))
    lines = [
        BEGIN,
        f"# Caprese adapter ({backbone.upper()} {density:g}, r = {config.get('r')})",
        "",
        "A Caprese adapter for PEFT (*Scalable LLM Math Reasoning Acceleration with Low-rank Distillation*, Dong "
        "et al., 2025), made with `caprese_peft`. Prompt tokens (prefill) run the original dense model; every "
        "generated token runs a sparse feed-forward block plus a distilled low-rank correction, which recovers the "
        "math reasoning the sparse block alone loses.",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Use",
        "",
        "```python",
        "import caprese_peft  # registers the CAPRESE PEFT type: import it before loading",
        "from peft import PeftModel",
        "",
        "model = PeftModel.from_pretrained(base_model, adapter_path_or_repo_id)",
        "```",
        "",
        "With lm-evaluation-harness: `caprese-peft lm-eval --model hf --model_args "
        "pretrained=BASE,peft=ADAPTER --tasks ...`.",
    ]
    evaluations = recorded.get("evaluations", [])
    if evaluations:
        lines += ["", "## Measured figures"]
    for e in evaluations:
        methods = {"this adapter": e["metrics"], **e.get("baselines", {})}
        names = list(dict.fromkeys(k for m in methods.values() for k in m))
        lines += [
            "",
            f"On `{e['dataset']}`" + (f" ({e['notes']})" if e.get("notes") else "") + ":",
            "",
            "| method | " + " | ".join(names) + " |",
            "| --- | " + " | ".join("---:" for _ in names) + " |",
        ]
        for method, values in methods.items():
            cells = " | ".join(_figure(values[n], n) if n in values else "" for n in names)
            lines.append(f"| {method} | {cells} |")
    lines.append(END)
    return "\n".join(lines)


__all__ = ["is_caprese_model", "render_section", "update_model_card", "write_model_card"]
