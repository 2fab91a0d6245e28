"""Distillation: data preparation, the two losses alone, the trainer on tiny models, and the closed-form solver."""

from __future__ import annotations

import json
import warnings
from functools import partial

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import TrainingArguments

from caprese_peft import CapreseConfig, layerwise_losses, teacher_forcing
from caprese_peft.data import split_prompt_continuation
from caprese_peft.distill import (
    CapreseDataCollator,
    CapreseTrainer,
    CapreseTrainingArguments,
    features_from_record,
    hidden_state_mse,
    layerwise_loss,
    load_prompt_completion,
    prepare_dataset,
)
from caprese_peft.distill.closed_form import collect_moments, fit_closed_form, reduced_rank_solution, set_closed_form
from caprese_peft.distill.losses import next_token_kl
from caprese_peft.distill.trainer import output_logits
from caprese_peft.layer import named_caprese_layers

from conftest import VOCAB, greedy, tiny_model, tiny_tokenizer, wrap

ADAPTER = dict(backbone="cats", density=0.5, r=8)
# learning rates suited to the tiny random models (the paper's are for billion-parameter models)
STAGE_LR = {"layerwise": 6e-2, "e2e": 1e-2}


def id_records(n: int = 8, seed: int = 0, prompt=(4, 10), completion=(3, 8)) -> list[dict]:
    """Prompt-completion records already holding token ids, of varied lengths."""
    gen = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(n):
        n_prompt = int(torch.randint(*prompt, (1,), generator=gen))
        n_completion = int(torch.randint(*completion, (1,), generator=gen))
        ids = torch.randint(3, VOCAB, (n_prompt + n_completion,), generator=gen).tolist()
        records.append({"prompt": ids[:n_prompt], "completion": ids[n_prompt:]})
    return records


def student(arch: str = "llama", seed: int = 0):
    """A fresh adapter to distil: ``R = 0``, so it starts as the backbone alone, as in the paper."""
    return wrap(tiny_model(arch, seed=seed), init_weights=True, **ADAPTER)


def training_args(tmp_path, **overrides) -> CapreseTrainingArguments:
    options = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    return CapreseTrainingArguments(**{**options, **overrides})


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "caprese_" not in n}


def factors(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "caprese_" in n}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# ---- losses, alone ----


def test_next_token_kl_in_chunks_equals_the_full_computation():
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(12, 40, bias=False)
    student = torch.randn(2, 7, 12, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 7, 12, generator=gen)
    mask = torch.rand(2, 7, generator=gen) > 0.3
    got = next_token_kl(student, teacher, head, mask, chunk_tokens=3)  # chunks that do not divide the tokens
    got.backward()
    got_grad = student.grad.clone()
    student.grad = None
    p, q = head(teacher[mask]).log_softmax(-1), head(student[mask]).log_softmax(-1)
    want = (p.exp() * (p - q)).sum(-1).mean()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, student.grad, rtol=1e-5, atol=1e-7)
    assert float(next_token_kl(teacher, teacher, head, mask)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="selects no token"):
        next_token_kl(student, teacher, head, torch.zeros_like(mask))


def test_split_prompt_continuation_lays_out_as_generation():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    prompt = torch.tensor([[0, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    split = split_prompt_continuation(ids, mask, prompt)
    assert split.prompt_ids.tolist() == [[0, 0, 5], [4, 5, 6]] and split.prompt_mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert split.continuation_ids.tolist() == [[6, 7, 8], [7, 8, 9]]
    assert split.continuation_positions.tolist() == [[1, 2, 3], [3, 4, 5]]
    short = split_prompt_continuation(ids, mask, torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]))
    assert short.continuation_ids.tolist() == [[8, 0, 0, 0], [6, 7, 8, 9]]  # right-padded
    assert short.continuation_mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]


def test_layerwise_loss_is_the_sum():
    losses = [torch.tensor(0.5), torch.tensor(1.25, dtype=torch.bfloat16), torch.tensor(2.0)]
    got = layerwise_loss(losses)
    assert got.dtype == torch.float32 and got.item() == 3.75
    with pytest.raises(ValueError, match="No Caprese layer reported"):
        layerwise_loss([])
    with pytest.raises(ValueError, match="scalar"):
        layerwise_loss([torch.ones(2)])


def test_hidden_state_mse_hand_computed():
    student = torch.tensor([[[1.0, 2.0], [5.0, 5.0], [0.0, 3.0]]], requires_grad=True)  # (1, 3, 2)
    teacher = torch.tensor([[[0.0, 0.0], [float("nan"), 1.0], [1.0, 1.0]]])
    mask = torch.tensor([[True, False, True]])
    # token 0: (1 + 4) / 2 = 2.5; token 2: (1 + 4) / 2 = 2.5; the NaN at the unmasked token stays out
    loss = hidden_state_mse(student, teacher, mask)
    assert loss.item() == 2.5
    loss.backward()
    # d/ds mean over 2 tokens x 2 features of (s - t)^2 = 2 (s - t) / 4
    assert torch.equal(student.grad, torch.tensor([[[0.5, 1.0], [0.0, 0.0], [-0.5, 1.0]]]))

    # a mean over tokens of means over features, in fp32 from bf16 inputs
    s2 = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]], dtype=torch.bfloat16)
    got = hidden_state_mse(s2, torch.zeros_like(s2), torch.ones(1, 2, dtype=torch.bool))
    assert got.dtype == torch.float32 and got.item() == (4 / 4 + 4 / 4) / 2

    with pytest.raises(ValueError, match="differ in shape"):
        hidden_state_mse(student, teacher[:, :2], mask)
    with pytest.raises(ValueError, match="mask has shape"):
        hidden_state_mse(student, teacher, mask[:, :2])
    with pytest.raises(ValueError, match="no continuation token"):
        hidden_state_mse(student, teacher, torch.zeros_like(mask))


# ---- data ----


def test_features_from_token_ids_and_truncation():
    record = {"prompt": [5, 6, 7], "completion": [8, 9]}
    assert features_from_record(record) == {
        "input_ids": [5, 6, 7, 8, 9],
        "attention_mask": [1, 1, 1, 1, 1],
        "prompt_mask": [True, True, True, False, False],
    }
    assert features_from_record(record, max_length=4)["input_ids"] == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="max_length=3 truncates the whole completion"):
        features_from_record(record, max_length=3)


def test_collator_left_pads_with_the_tokenizer_pad_id(tokenizer):
    features = [
        features_from_record(r)
        for r in ({"prompt": [5, 6], "completion": [7]}, {"prompt": [4], "completion": [8, 9, 10]})
    ]
    collator = CapreseDataCollator.from_tokenizer(tokenizer)
    assert collator.pad_token_id == tokenizer.pad_token_id == 3
    batch = collator(features)
    assert torch.equal(batch["input_ids"], torch.tensor([[3, 5, 6, 7], [4, 8, 9, 10]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    assert torch.equal(batch["prompt_mask"], torch.tensor([[False, True, True, False], [True, False, False, False]]))
    assert CapreseDataCollator(pad_token_id=0, pad_to_multiple_of=8)(features)["input_ids"].shape == (2, 8)


def test_chat_and_text_records_through_a_real_tokenizer(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    chat = {
        "prompt": [{"role": "user", "content": "what is two plus three"}],
        "completion": [{"role": "assistant", "content": "five"}],
    }
    got = features_from_record(chat, tokenizer)
    prompt = ids(["<|user|>", "what", "is", "two", "plus", "three", "<|end|>", "<|assistant|>"])
    assert got["input_ids"] == prompt + ids(["five", "<|end|>"])
    assert got["prompt_mask"] == [True] * len(prompt) + [False, False]

    text = features_from_record({"prompt": "what is two plus three", "completion": " five"}, tokenizer)
    assert text["input_ids"] == ids(["what", "is", "two", "plus", "three", "five"])  # no EOS appended
    assert text["prompt_mask"] == [True] * 5 + [False]

    # a template that renders the prompt alone differently: the prompt ends where both renderings part
    odd = tokenizer.chat_template.replace("<|assistant|> {% endif %}", "<|assistant|> think {% endif %}")
    original, tokenizer.chat_template = tokenizer.chat_template, odd
    try:
        with pytest.warns(UserWarning, match="not a prefix"):
            cut = features_from_record(chat, tokenizer)
    finally:
        tokenizer.chat_template = original
    assert cut["input_ids"] == got["input_ids"] and cut["prompt_mask"] == got["prompt_mask"]


def test_load_jsonl_file_and_folder(tmp_path):
    records = id_records(3, prompt=(3, 5))
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    want = [features_from_record(r) for r in records]
    assert list(load_prompt_completion(path)) == want
    assert list(load_prompt_completion(str(folder))) == want  # a folder goes to load_dataset as a name
    assert list(load_prompt_completion(path, max_length=6))[0]["input_ids"] == want[0]["input_ids"][:6]


def test_tokenized_records_pass_through():
    records = [{"input_ids": [5, 6, 7], "prompt_mask": [True, False, False]}]
    assert list(prepare_dataset(records)) == [
        {"input_ids": [5, 6, 7], "prompt_mask": [True, False, False], "attention_mask": [1, 1, 1]}
    ]


def test_iterable_datasets_and_splits():
    import datasets

    records = id_records(3)
    streamed = prepare_dataset(datasets.Dataset.from_list(records).to_iterable_dataset())
    assert isinstance(streamed, datasets.IterableDataset)
    assert list(streamed) == [features_from_record(r) for r in records]
    with pytest.raises(TypeError, match=r"splits \['train'\]; pass one split"):
        prepare_dataset(datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}))


@pytest.mark.parametrize(
    ("records", "error", "match"),
    [
        ([{"question": "q", "answer": "a"}], ValueError, r"found fields \['answer', 'question'\]"),
        ([{"prompt": [5, 6], "completion": []}], ValueError, "Record 0: The completion is empty"),
        ([{"prompt": [], "completion": [5]}], ValueError, "Record 0: The prompt is empty"),
        ([{"prompt": "two plus", "completion": "three"}], ValueError, "need a tokenizer"),
        ([{"prompt": [{"role": "user", "content": "x"}], "completion": "y"}], TypeError, "same kind"),
        ([{"input_ids": [5, 6], "prompt_mask": [True, True]}], ValueError, "no continuation token"),
        ([{"input_ids": [5, 6], "prompt_mask": [True]}], ValueError, "differ in length"),
    ],
)
def test_bad_records_raise_clear_errors(records, error, match):
    with pytest.raises(error, match=match):
        prepare_dataset(records)


def test_bad_tokenized_records_raise_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="completion is empty after tokenization"):
        prepare_dataset([{"prompt": "what is two", "completion": "  "}], tokenizer)
    with pytest.raises(ValueError, match="max_length=3 truncates the whole completion"):
        prepare_dataset([{"prompt": "what is two plus", "completion": " five"}], tokenizer, max_length=3)
    chatless = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>")
    with pytest.raises(ValueError, match="chat template"):
        features_from_record(
            {"prompt": [{"role": "user", "content": "two"}], "completion": [{"role": "assistant", "content": "five"}]},
            chatless,
        )
    with pytest.raises(ValueError, match="lacks \\['prompt_mask'\\]"):
        CapreseDataCollator()([{"input_ids": [1, 2]}])


# ---- arguments and trainer checks ----


def test_arguments_defaults_and_validation(tmp_path):
    layerwise = CapreseTrainingArguments(output_dir=str(tmp_path))
    assert (layerwise.stage, layerwise.learning_rate, layerwise.num_train_epochs) == ("layerwise", 1e-3, 20.0)
    assert (str(layerwise.lr_scheduler_type.value), layerwise.warmup_steps) == ("linear", 0.02)
    assert layerwise.remove_unused_columns is False and layerwise.weight_decay == 0.0
    e2e = CapreseTrainingArguments(output_dir=str(tmp_path), stage="E2E")
    assert (e2e.stage, e2e.learning_rate, e2e.num_train_epochs) == ("e2e", 2e-5, 3.0)
    assert CapreseTrainingArguments(output_dir=str(tmp_path), stage="e2e", learning_rate=1e-4).learning_rate == 1e-4
    with pytest.raises(ValueError, match=r"stage must be one of \['layerwise', 'e2e'\], got 'distill'"):
        CapreseTrainingArguments(output_dir=str(tmp_path), stage="distill")
    with pytest.raises(ValueError, match="would drop prompt_mask"):
        CapreseTrainingArguments(output_dir=str(tmp_path), remove_unused_columns=True)
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        CapreseTrainingArguments(output_dir=str(tmp_path), max_length=1)


def test_trainer_rejects_models_without_a_trainable_caprese_adapter(tmp_path):
    args, data = training_args(tmp_path), id_records(2)
    with pytest.raises(ValueError, match="carries no Caprese adapter"):
        CapreseTrainer(tiny_model("llama"), args, train_dataset=data)
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="carries no Caprese adapter"):
        CapreseTrainer(lora, args, train_dataset=data)

    saved = tmp_path / "adapter"
    student().save_pretrained(saved)
    frozen = PeftModel.from_pretrained(tiny_model("llama"), saved)
    with pytest.raises(ValueError, match="is_trainable=True"):
        CapreseTrainer(frozen, args, train_dataset=data)
    with pytest.raises(TypeError, match="takes CapreseTrainingArguments"):
        CapreseTrainer(student(), TrainingArguments(output_dir=str(tmp_path)), train_dataset=data)


def test_trainer_rejects_bad_datasets_before_training(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"found fields \['text'\]"):
        CapreseTrainer(student(), training_args(tmp_path), train_dataset=[{"text": "what is two"}])
    records = [{"prompt": [5, 6], "completion": [7, 8]}, {"prompt": [5, 6, 7, 8, 9], "completion": [7]}]
    with pytest.raises(ValueError, match="Record 1: max_length=4 truncates the whole completion"):
        CapreseTrainer(student(), training_args(tmp_path, max_length=4), train_dataset=records)
    with pytest.raises(ValueError, match="need a tokenizer"):
        CapreseTrainer(student(), training_args(tmp_path), eval_dataset=[{"prompt": "two", "completion": " five"}])

    trainer = CapreseTrainer(student(), training_args(tmp_path), train_dataset=id_records(2))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    del batch["prompt_mask"]
    with pytest.raises(ValueError, match=r"The batch lacks \['prompt_mask'\]"):
        trainer.compute_loss(trainer.model, batch)


def test_compute_loss_on_every_architecture(arch, tmp_path):
    """Both losses run on each supported decoder, are positive, and send gradients to L and R only."""
    for stage in ("layerwise", "e2e"):
        peft_model = student(arch)
        with torch.no_grad():  # a non-zero correction, so that L gets a gradient too
            for name, p in peft_model.named_parameters():
                if "caprese_R" in name:
                    p.normal_(0.0, 0.05)
        trainer = CapreseTrainer(peft_model, training_args(tmp_path, stage=stage), train_dataset=id_records(3))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        loss = trainer.compute_loss(peft_model, batch)
        assert loss.dim() == 0 and loss.item() > 0
        loss.backward()
        grads = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads == {n for n, _ in peft_model.named_parameters() if "caprese_" in n}


# ---- training ----


@pytest.fixture(scope="module", params=["layerwise", "e2e"])
def trained(request, tmp_path_factory):
    """A tiny Llama distilled for 8 epochs on 8 fixed records, with its eval loss and weights from before."""
    stage = request.param
    peft_model = student()
    records = id_records(8)
    options = dict(stage=stage, learning_rate=STAGE_LR[stage], num_train_epochs=8, per_device_train_batch_size=8)
    if stage == "e2e":  # gradient accumulation: two batches of 4 per step
        options.update(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    args = training_args(tmp_path_factory.mktemp(stage), **options)
    trainer = CapreseTrainer(peft_model, args, train_dataset=records, eval_dataset=records)
    before = {
        "eval": trainer.evaluate()["eval_loss"],
        "base": base_weights(peft_model),
        "factors": factors(peft_model),
    }
    trainer.train()
    return {"stage": stage, "trainer": trainer, "model": peft_model, "before": before}


def test_training_lowers_the_loss(trained):
    trainer, before = trained["trainer"], trained["before"]
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 8  # one optimizer step per epoch
    assert logged[-1] < 0.8 * logged[0], logged
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.8 * before["eval"], (before["eval"], after)
    # the eval loss before training is the stage's loss of the pure backbone, computed independently here
    batch = CapreseDataCollator()(list(trainer.train_dataset))
    reference = student()
    mask, prompt = batch["attention_mask"], batch["prompt_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        if trained["stage"] == "layerwise":
            with layerwise_losses(reference, prompt, mask) as losses:
                reference(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions)
            want = sum(loss.item() for loss in losses)
        else:
            teacher = tiny_model("llama")(
                batch["input_ids"], attention_mask=mask, position_ids=positions, output_hidden_states=True
            )
            with teacher_forcing(reference, prompt, mask):
                forced = reference(
                    input_ids=batch["input_ids"],
                    attention_mask=mask,
                    position_ids=positions,
                    output_hidden_states=True,
                )
            sel = mask.bool() & ~prompt
            want = (forced.hidden_states[-1][sel] - teacher.hidden_states[-1][sel]).square().mean().item()
    assert before["eval"] == pytest.approx(want, rel=1e-5)


def test_training_changes_only_the_low_rank_factors(trained):
    model, before = trained["model"], trained["before"]
    after = base_weights(model)
    assert after.keys() == before["base"].keys()
    assert all(torch.equal(after[n], before["base"][n]) for n in after)
    changed = factors(model)
    assert len(changed) == 2 * 4
    assert all(not torch.equal(changed[n], before["factors"][n]) for n in changed)


def test_trained_adapter_reloads_with_identical_outputs(trained, tmp_path):
    model = trained["model"].eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    batch = CapreseDataCollator()(list(trained["trainer"].train_dataset))
    mask, prompt = batch["attention_mask"], batch["prompt_mask"]
    with torch.no_grad():
        with teacher_forcing(model, prompt, mask):
            want = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        with teacher_forcing(loaded, prompt, mask):
            got = loaded(input_ids=batch["input_ids"], attention_mask=mask).logits
    assert torch.equal(got, want)
    ids, prompt_only = batch["input_ids"][:3, :6], torch.ones(3, 6, dtype=torch.long)
    want_seq, want_logits = greedy(model, ids, prompt_only, n=5)
    got_seq, got_logits = greedy(loaded, ids, prompt_only, n=5)
    assert torch.equal(got_seq, want_seq) and torch.equal(got_logits, want_logits)


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path):
    options = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="steps", save_steps=2)
    records = id_records(6, seed=3)
    full = student()
    CapreseTrainer(full, training_args(tmp_path / "full", **options), train_dataset=records).train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()

    resumed = student()
    CapreseTrainer(resumed, training_args(tmp_path / "resumed", **options), train_dataset=records).train(
        resume_from_checkpoint=str(checkpoint)
    )
    want, got = factors(full), factors(resumed)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_the_prompt_runs_once_without_a_graph_and_gives_the_single_pass_loss(loss, tmp_path):
    """The end-to-end step prefills the prompts without a graph and continues from their cache: the loss and the
    gradients of L and R equal those of one teacher-forced pass over prompt and continuation."""
    peft_model = student("qwen2")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "caprese_R" in name:
                p.normal_(0.0, 0.05)
    trainer = CapreseTrainer(peft_model, training_args(tmp_path, stage="e2e", loss=loss), train_dataset=id_records(4))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    results = []
    for states in (trainer._continuation_states, trainer._teacher_forced_states):
        student_hidden, teacher, mask, _ = states(peft_model, peft_model, batch)
        if loss == "kl":
            value = next_token_kl(student_hidden, teacher, partial(output_logits, peft_model), mask)
        else:
            value = hidden_state_mse(student_hidden, teacher, mask)
        peft_model.zero_grad()
        value.backward()
        results.append(
            (value.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None})
        )
    (split, split_grads), (single, single_grads) = results
    torch.testing.assert_close(split, single, rtol=1e-5, atol=1e-7)
    assert split_grads.keys() == single_grads.keys() and split_grads
    for name in split_grads:
        torch.testing.assert_close(split_grads[name], single_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert trainer.compute_loss(peft_model, batch).item() == pytest.approx(split.item(), rel=1e-6)


@pytest.mark.parametrize("stage", ["layerwise", "e2e"])
def test_activation_checkpointing_trains_the_same(stage, tmp_path):
    """Layers recomputed in the backward pass see the step they ran with, so the updates do not change."""
    results = []
    for checkpointing in (False, True):
        peft_model = student()
        options = dict(stage=stage, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2)
        args = training_args(tmp_path / str(checkpointing), activation_checkpointing=checkpointing, **options)
        CapreseTrainer(peft_model, args, train_dataset=id_records(4)).train()
        assert peft_model.get_base_model().is_activation_checkpointing == checkpointing
        results.append(factors(peft_model))
    plain, checkpointed = results
    assert all(not torch.equal(plain[n], factors(student())[n]) for n in plain if "caprese_R" in n)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_tokenizes_chat_records(tmp_path, tokenizer):
    records = [
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in [("what is two plus three", "five"), ("the answer", "think five"), ("two plus two", "the answer")]
    ]
    trainer = CapreseTrainer(
        student(),
        training_args(tmp_path, num_train_epochs=1, per_device_train_batch_size=3),
        train_dataset=records,
        processing_class=tokenizer,
    )
    assert trainer.train_dataset[0] == features_from_record(records[0], tokenizer)
    assert trainer.data_collator.pad_token_id == tokenizer.pad_token_id
    result = trainer.train()
    assert result.global_step == 1 and result.training_loss > 0


# ---- closed form ----


@pytest.mark.parametrize("backbone", ["cats", "griffin"])
def test_closed_form_reaches_the_measured_optimum_below_zero_init(backbone):
    peft_model = get_peft_model(tiny_model("llama"), CapreseConfig(**{**ADAPTER, "backbone": backbone}))
    collate = CapreseDataCollator()
    batches = [
        collate(list(prepare_dataset(id_records(4, seed=s, prompt=(6, 9), completion=(18, 24))))) for s in (1, 2)
    ]

    def measured(batch):
        with torch.no_grad(), layerwise_losses(peft_model, batch["prompt_mask"], batch["attention_mask"]) as losses:
            peft_model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp_min(0),
            )
        return torch.stack(losses)

    zero_init = measured(batches[0])
    reached = fit_closed_form(peft_model, batches[:1])
    after = measured(batches[0])
    assert torch.allclose(after.double(), torch.tensor(list(reached.values()), dtype=torch.float64), rtol=1e-4)
    assert bool((after < 0.9 * zero_init).all()), (zero_init, after)

    # gradient steps from the closed form do not improve the layer-wise loss: it is the minimum
    params = [p for n, p in peft_model.named_parameters() if "caprese_" in n]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    batch = batches[0]
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    for _ in range(10):
        optimizer.zero_grad()
        with layerwise_losses(peft_model, batch["prompt_mask"], batch["attention_mask"]) as losses:
            peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions)
        layerwise_loss(losses).backward()
        optimizer.step()
    assert measured(batches[0]).sum() >= after.sum() * (1 - 1e-5)


def test_closed_form_matches_brute_force_reduced_rank_regression():
    peft_model = student()
    collate = CapreseDataCollator()
    batches = [
        collate(list(prepare_dataset(id_records(4, seed=s, prompt=(6, 9), completion=(18, 24))))) for s in (1, 2)
    ]
    layer_name, layer = next(iter(named_caprese_layers(peft_model).items()))

    # brute force: materialise X and Y of one layer over both batches, then lstsq + SVD in fp64
    xs, ys = [], []

    def grab(module, args, output):
        x = args[0]
        mlp, backbone = module.get_base_layer(), module.caprese_backbone["default"]
        gate = mlp.act_fn(mlp.gate_proj(x))
        z = gate * mlp.up_proj(x)
        keep = backbone.keep_mask(gate, backbone.calibrate(gate, z, grab.prompt))
        rows = grab.rows
        xs.append(x[rows].double())
        ys.append((mlp.down_proj(z) - mlp.down_proj(z * keep))[rows].double())

    handle = layer.register_forward_hook(grab)
    with torch.no_grad():
        for b in batches:
            grab.prompt, grab.rows = b["prompt_mask"], b["attention_mask"].bool() & ~b["prompt_mask"]
            positions = (b["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=positions)
    handle.remove()
    x, y = torch.cat(xs), torch.cat(ys)  # (N, D)
    assert x.shape[0] > 2 * x.shape[1]  # more tokens than dimensions: the problem is well posed
    b_ols = torch.linalg.lstsq(x, y).solution
    _, _, vh = torch.linalg.svd(x @ b_ols, full_matrices=False)
    want = b_ols @ vh[:8].T @ vh[:8]  # (D, D), rank 8

    moments = collect_moments(peft_model, batches)
    assert moments[layer_name].tokens == x.shape[0]
    left, right = reduced_rank_solution(moments[layer_name].xx, moments[layer_name].xy, r=8, ridge=0.0)
    got = left @ right
    assert torch.linalg.matrix_rank(got) == 8
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    # and it beats any other rank-8 candidate tried, e.g. the truncated SVD of B_ols itself
    u, s, v = torch.linalg.svd(b_ols)
    naive = u[:, :8] @ torch.diag(s[:8]) @ v[:8]
    assert (y - x @ got).square().sum() < (y - x @ naive).square().sum()


def test_moments_serve_every_rank():
    """collect_moments does not depend on the rank: set_closed_form on another rank equals fitting that rank."""
    collate = CapreseDataCollator()
    batch = collate(list(prepare_dataset(id_records(4, seed=3, prompt=(6, 9), completion=(18, 24)))))
    small = get_peft_model(tiny_model("llama"), CapreseConfig(**{**ADAPTER, "r": 4}))
    large = get_peft_model(tiny_model("llama"), CapreseConfig(**{**ADAPTER, "r": 12}))
    reference = get_peft_model(tiny_model("llama"), CapreseConfig(**{**ADAPTER, "r": 12}))
    want = fit_closed_form(reference, [batch])
    got = set_closed_form(large, collect_moments(small, [batch]))
    assert got == pytest.approx(want, rel=1e-6)
    assert got != pytest.approx(fit_closed_form(small, [batch]), rel=1e-3)  # rank 4 reaches less
    with pytest.raises(ValueError, match="No moments for the Caprese layers"):
        set_closed_form(get_peft_model(tiny_model("qwen2"), CapreseConfig(**ADAPTER)), {})


def test_closed_form_warns_when_it_sees_too_few_tokens():
    collate = CapreseDataCollator()
    few = collate(list(prepare_dataset(id_records(2, seed=4, prompt=(6, 9), completion=(18, 24)))))
    many = collate(list(prepare_dataset(id_records(12, seed=4, prompt=(6, 9), completion=(18, 24)))))
    peft_model = get_peft_model(tiny_model("llama"), CapreseConfig(**ADAPTER))
    with pytest.warns(UserWarning, match="will overfit"):
        fit_closed_form(peft_model, [few])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_closed_form(peft_model, [many])
