"""The miniature v2's extra measures: held-out NLL of the answer span (AnswerSpanNLL) and ΔL on human-written
answers (ReferenceTextNLL), each against a direct computation on a tiny model."""

from __future__ import annotations

import json

import lightning.pytorch as L
import pytest
import torch

from talr.callbacks import AnswerSpanNLL, ReferenceTextNLL
from talr.callbacks.answer_nll import answer_span
from talr.data.datamodule import DomainDataModule
from talr.data.encoding import Collator
from talr.methods import SFT
from talr.tasks.medcalc import MedCalc


def test_answer_span_covers_exactly_the_value(tokenizer):
    target = json.dumps({"step_by_step_thinking": 'The "answer": "7" is not it. 3 + 4.5 = 7.5', "answer": "7.5"})
    ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    span = answer_span(tokenizer, ids)
    chosen = [i for i, s in zip(ids, span) if s]
    assert chosen and tokenizer.decode(chosen).strip('"} ') == "7.5"  # the last key, not the one in the text
    assert span[-1] is False and not any(span[: len(span) // 2])
    assert not any(answer_span(tokenizer, tokenizer("no key here")["input_ids"]))


def _direct_token_losses(model_dir, examples):
    from transformers import AutoModelForCausalLM

    batch = Collator(0)(examples)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), batch["input_ids"][:, 1:].flatten(),
                                               reduction="none").view(logits.shape[:2])
    return losses, batch["labels"][:, 1:] != -100, batch["input_ids"]


def test_answer_nll_equals_a_direct_computation(tmp_path, tiny_model_dir, tokenizer):
    task = MedCalc(source="synthetic", format="cot", max_examples={"train": 2, "validation": 3, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=str(tiny_model_dir), max_length=1024, eval_batch_size=2)
    module = SFT(pretrained=str(tiny_model_dir), generate_in_eval=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[AnswerSpanNLL()])
    trainer.validate(module, dm)
    got = float(trainer.callback_metrics["val/answer_nll"])
    losses, mask, ids = _direct_token_losses(tiny_model_dir, dm.examples["validation"])
    total, count = 0.0, 0
    for b in range(losses.shape[0]):
        positions = mask[b].nonzero().flatten()
        span = torch.tensor(answer_span(tokenizer, ids[b, positions + 1].tolist()))
        assert 0 < int(span.sum()) < 10  # a short numeric answer inside a long CoT target
        total += float(losses[b, positions[span]].sum())
        count += int(span.sum())
    assert got == pytest.approx(total / count, rel=1e-4)
    assert got != pytest.approx(float(trainer.callback_metrics["val/nll"]), rel=1e-3)  # not the whole target


def test_reference_text_nll_is_the_answers_nll_and_starts_at_zero(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "Tom has 4 apples and eats 1. How many are left?", "answer": "4 - 1 = 3\n#### 3"},
            {"question": "unused", "answer": "unused"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    callback = ReferenceTextNLL(str(data), num_examples=2, every_n_steps=1)
    base = callback.setup_reference(model, tokenizer)
    total, count = 0.0, 0
    for r in rows[:2]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=True,
                                               add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        total += float(torch.nn.functional.cross_entropy(logits.double(), ids[0, len(prompt):], reduction="sum"))
        count += len(answer)
    assert base == pytest.approx(total / count, rel=1e-5)
    assert callback.measure(model) == {"drift/gsm8k_nll": pytest.approx(base), "drift/gsm8k_nll_delta": 0.0}
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    assert callback.measure(model)["drift/gsm8k_nll_delta"] != 0.0
    with pytest.raises(ValueError, match="non-empty strings"):
        ReferenceTextNLL(str(data), prompt_key="nope").setup_reference(model, tokenizer)
