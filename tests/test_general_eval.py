"""General evaluation on a tiny random model: the callback logs exactly what lm-eval computes, baseline first."""

from __future__ import annotations

import json
import random

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, make_tiny_model, require
from lightning.pytorch.loggers import Logger

from talr.general import CodeLengthDriftCallback, GeneralEvalCallback, evaluate_general, flat_metrics
from talr.general.evaluate import metric_key

TASKS = ["ifeval", "gsm8k", "humaneval"]
LIMIT, MAX_GEN_TOKS, BATCH = 4, 16, 4


class MemoryLogger(Logger):
    def __init__(self, events):
        super().__init__()
        self.events = events

    name = "memory"
    version = "0"

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.events.append(("log", step, dict(metrics)))


class TinyLM(L.LightningModule):
    """What the callbacks need: `.model` and `.tokenizer`; trains on random tokens."""

    def __init__(self, model, tokenizer, events):
        super().__init__()
        self.model, self.tokenizer, self.events = model, tokenizer, events

    def training_step(self, batch, batch_idx):
        self.events.append(("train_step", self.global_step, None))
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=1.0)


def direct_lm_eval(model, tokenizer, tmp_path):
    """lm-eval called by hand on the same model, tasks and limit (lm-eval's default seeds); under the chat
    template HumanEval is lm-eval's humaneval_instruct (talr.general.lm_tasks.CHAT_VARIANT)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from talr.general.lm_tasks import make_task_manager

    tasks = ["ifeval", "gsm8k", "humaneval_instruct"]
    manager = make_task_manager(tasks, tmp_path / "direct_tasks", SHARED_DATA)
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH), tasks=tasks, limit=LIMIT,
        task_manager=manager, apply_chat_template=True, gen_kwargs={"max_gen_toks": MAX_GEN_TOKS},
        confirm_run_unsafe_code=True,
    )
    flat = {}
    for task, values in out["results"].items():
        filters = {k.split(",")[1] for k in values if "," in k}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and "stderr" not in metric:
                flat[f"general/{task}/{metric_key(metric, filter_name, len(filters))}"] = value
    return flat


def test_callback_logs_lm_eval_numbers_with_baseline_before_first_step(tokenizer, tmp_path):
    require(SHARED_DATA)
    expected = direct_lm_eval(make_tiny_model(tokenizer, seed=1, tie_word_embeddings=False), tokenizer, tmp_path)
    # untied random weights write varied garbage, which passes some IFEval checks: a real number to compare
    assert expected["general/ifeval/inst_level_loose_acc"] > 0

    events: list = []
    module = TinyLM(make_tiny_model(tokenizer, seed=1, tie_word_embeddings=False), tokenizer, events)
    general = GeneralEvalCallback(tasks=TASKS, limit=LIMIT, every_n_epochs=None, data_dir=str(SHARED_DATA),
                                  allow_code_execution=True, batch_size=BATCH, max_gen_toks=MAX_GEN_TOKS)
    drift = CodeLengthDriftCallback(every_n_steps=1, num_prompts=4, max_new_tokens=8)
    data = torch.utils.data.TensorDataset(torch.randint(0, len(tokenizer), (4, 12)))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=MemoryLogger(events),
                        callbacks=[general, drift], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))

    logs = [(i, step, m) for i, (kind, step, m) in enumerate(events) if kind == "log"]
    first_train = next(i for i, (kind, _, _) in enumerate(events) if kind == "train_step")
    general_logs = [(i, step, m) for i, step, m in logs if "general/score" in m]
    assert [step for _, step, _ in general_logs] == [0, 2]  # baseline at step 0, final after step 2
    baseline_at, _, baseline = general_logs[0]
    assert baseline_at < first_train
    assert {k: baseline[k] for k in expected} == expected  # exactly lm-eval's numbers
    headline = [baseline["general/ifeval/prompt_level_strict_acc"],
                baseline["general/gsm8k/exact_match_strict_match"], baseline["general/humaneval_instruct/pass@1"]]
    assert baseline["general/score"] == pytest.approx(np.mean(headline))
    assert [h["when"] for h in general.history] == ["start", "end"]
    assert module.general_baseline == baseline
    per_task = {k: v for k, v in baseline.items() if k.startswith("general/eval_seconds/")}
    assert set(per_task) == {f"general/eval_seconds/{t}" for t in ("ifeval", "gsm8k", "humaneval_instruct")}
    assert sum(per_task.values()) <= baseline["general/eval_seconds"]
    assert float(trainer.callback_metrics["general/score"]) == pytest.approx(general.history[-1]["metrics"]["general/score"])

    drift_logs = [(i, step, m) for i, step, m in logs if "drift/nll_delta" in m]
    assert [step for _, step, _ in drift_logs] == [0, 1, 2]
    assert drift_logs[0][0] < first_train and drift_logs[0][2]["drift/nll_delta"] == 0.0
    assert drift_logs[-1][2]["drift/nll_delta"] > 0  # lr=1.0 on random tokens moves the model


def test_drift_is_zero_before_any_update_and_positive_after(tokenizer):
    model = make_tiny_model(tokenizer, seed=2, tie_word_embeddings=False)
    drift = CodeLengthDriftCallback(num_prompts=6, max_new_tokens=8, batch_size=4)
    base = drift.setup_reference(model, tokenizer)
    assert len(drift.answer_ids) == 6 and all(0 < len(a) <= 8 for a in drift.answer_ids)
    assert base > 0
    assert drift.measure(model) == {"drift/nll": base, "drift/nll_delta": 0.0}
    model.train()
    ids = torch.randint(0, len(tokenizer), (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(model.parameters(), lr=5.0).step()
    after = drift.measure(model)
    assert after["drift/nll_delta"] > 0 and after["drift/nll"] == pytest.approx(base + after["drift/nll_delta"])
    assert model.training  # mode restored


def test_evaluate_general_restores_state_and_reports_versions(tokenizer):
    model = make_tiny_model(tokenizer, seed=3).train()
    random.seed(7)
    torch.manual_seed(7)
    expected_random, expected_torch = random.random(), torch.rand(1)
    random.seed(7)
    torch.manual_seed(7)
    result = evaluate_general(model, tokenizer, tasks=["gsm8k"], limit=2, max_gen_toks=4, batch_size=2,
                              data_dir=require(SHARED_DATA), bootstrap_iters=0)
    assert random.random() == expected_random and torch.equal(torch.rand(1), expected_torch)
    assert model.training and all(m.training for m in model.modules())
    assert result["versions"]["tasks"] == {"gsm8k": 3.0} and result["versions"]["lm_eval"] == "0.4.13"
    assert result["n_samples"]["gsm8k"] == {"original": 1319, "effective": 2}
    assert result["config"]["apply_chat_template"] is True and result["config"]["limit"] == 2
    assert set(flat_metrics(result)) == {"general/gsm8k/exact_match_strict_match",
                                         "general/gsm8k/exact_match_flexible_extract", "general/score"}
    assert result["general/score"] == result["results"]["gsm8k"]["exact_match_strict_match"]


def test_cli_writes_results_json(tiny_model_dir, tmp_path, capsys):
    from talr.general.cli import main

    out = tmp_path / "results.json"
    assert main(["--model", str(tiny_model_dir), "--tasks", "ifeval", "--limit", "2", "--max-gen-toks", "4",
                 "--data-dir", str(require(SHARED_DATA)), "--batch-size", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"results", "general/score", "versions", "settings", "wall_time_s", "n_samples"}
    assert result["settings"]["model"] == str(tiny_model_dir) and result["settings"]["device"] == "cpu"
    assert result["versions"]["tasks"] == {"ifeval": 4.0}
    assert list(result["task_wall_time_s"]) == ["ifeval"]  # seconds per task, within the evaluation's
    assert 0 < result["task_wall_time_s"]["ifeval"] <= result["wall_time_s"]["evaluate"]
    assert "prompt_level_strict_acc" in capsys.readouterr().out


def test_sharded_model_is_refused(tokenizer, tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = make_tiny_model(tokenizer, seed=4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        fully_shard(model)  # FSDP2: parameters become DTensors
        with pytest.raises(NotImplementedError, match="sharded"):
            evaluate_general(model, tokenizer, tasks=["gsm8k"], limit=1, data_dir=require(SHARED_DATA))
    finally:
        dist.destroy_process_group()


class RecordingEval(GeneralEvalCallback):
    """Stands in for lm-eval (fixed numbers) and records, per rank, who evaluated and what was logged."""

    def __init__(self, out_dir):
        super().__init__(tasks=["gsm8k"], every_n_epochs=None, every_n_steps=1, data_parallel=False)
        self.out_dir = out_dir

    def run_eval(self, model, tokenizer):
        import torch.distributed as dist

        with open(f"{self.out_dir}/ran_on_rank{dist.get_rank()}", "a") as f:
            f.write("x")
        return {"results": {"gsm8k": {"exact_match_strict_match": 0.25}}, "general/score": 0.25, "wall_time_s": 0.0}

    def evaluate(self, trainer, pl_module, when):
        metrics = super().evaluate(trainer, pl_module, when)
        with open(f"{self.out_dir}/logged_rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps([trainer.global_step, metrics["general/score"]]) + "\n")
        return metrics


def test_two_ranks_evaluate_on_rank0_only_and_share_the_numbers(tokenizer, tmp_path):
    module = TinyLM(make_tiny_model(tokenizer, seed=5), tokenizer, [])
    data = torch.utils.data.TensorDataset(torch.randint(0, len(tokenizer), (8, 8)))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                        callbacks=[RecordingEval(str(tmp_path))], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert (tmp_path / "ran_on_rank0").read_text() == "xxx" and not (tmp_path / "ran_on_rank1").exists()
    for rank in (0, 1):  # start, step 1, step 2 (at_end skipped: step 2 was just evaluated)
        logged = [json.loads(line) for line in (tmp_path / f"logged_rank{rank}").read_text().splitlines()]
        assert logged == [[0, 0.25], [1, 0.25], [2, 0.25]]
