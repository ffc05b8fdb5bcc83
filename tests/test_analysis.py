"""`python -m talr analyze` (per-token probabilities of a training set) and the HardTokenShare callback."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from helpers import fit_config

from talr.analysis import advice, summarize
from talr.callbacks.token_share import HardTokenShare
from talr.token_stats import TokenLosses


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-analysis")
    make_tiny_model(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_summarize_known_values():
    p = np.array([0.01, 0.07, 0.15, 0.3, 0.9])
    s = summarize(-np.log(p))
    assert s["share_below"] == pytest.approx({"0.05": 0.2, "0.1": 0.4, "0.2": 0.6, "0.5": 0.8})
    assert s["median_p"] == pytest.approx(0.15) and s["mean_nll"] == pytest.approx(float(-np.log(p).mean()))
    assert s["histogram"]["counts"][0] == 1 and s["histogram"]["counts"][1] == 1 and s["histogram"]["counts"][18] == 1
    assert sum(s["histogram"]["counts"]) == 5 and len(s["histogram"]["bin_edges"]) == 21
    assert summarize(np.array([0.0]))["histogram"]["counts"][-1] == 1  # p = 1 falls in the last bin


def test_advice_quotes_numbers():
    stats = {"share_below": {"0.2": 0.31}, "median_p": 0.61, "mean_nll": 1.46, "n_tokens": 1703}
    text = " ".join(advice(stats, "cot"))
    assert "31.0%" in text and "0.610" in text and "1e-6" in text and "TALR" in text and "0.692" in text
    few = " ".join(advice({**stats, "share_below": {"0.2": 0.02}}, "label"))
    assert "few hard tokens" in few and "Label-only" in few


def test_analyze_tiny_model(tiny_dir, tokenizer, tmp_path):
    from talr.cli import main
    from talr.data.encoding import encode_rows
    from talr.tasks.medcalc import MedCalc

    out = tmp_path / "analysis.json"
    main(["analyze", "--model", str(tiny_dir), "--task", "medcalc", "--source", "synthetic", "--format", "label",
          "--limit", "8", "--max-length", "512", "--batch-size", "3", "--output", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert result["n_examples"] == 8 and len(result["hardest_tokens"]) == 20
    assert sum(result["histogram"]["counts"]) == result["n_tokens"]
    assert sum(result["histogram"]["shares"]) == pytest.approx(1.0)
    # independently: each example alone (no padding), log-softmax by hand
    model = make_tiny_model(tokenizer, seed=1).eval()
    task = MedCalc(source="synthetic", format="label", max_examples={"train": 8})
    examples, _ = encode_rows(task, task.load_splits()["train"], tokenizer, 512, progress=False)
    nll = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            labels = torch.tensor(e["labels"][1:])
            keep = labels != -100
            nll.append(-logp[keep].gather(1, labels[keep, None]).squeeze(1))
    nll = torch.cat(nll)
    p = torch.exp(-nll)
    assert result["n_tokens"] == len(nll)
    for t in ("0.05", "0.1", "0.2", "0.5"):
        assert result["share_below"][t] == pytest.approx(float((p < float(t)).double().mean()))
    assert result["mean_nll"] == pytest.approx(float(nll.mean()), rel=1e-4)
    assert result["median_p"] == pytest.approx(float(np.median(p.numpy())), rel=1e-3)  # numpy: mean of the middle two
    hardest = result["hardest_tokens"]
    assert hardest[0]["nll"] == pytest.approx(float(nll.max()), rel=1e-4)
    assert [h["nll"] for h in hardest] == sorted((h["nll"] for h in hardest), reverse=True)
    h = hardest[0]
    assert h["p"] == pytest.approx(math.exp(-h["nll"]))
    assert h["token"] == tokenizer.decode([examples[h["example"]]["input_ids"][h["position"]]])
    assert f"{result['share_below']['0.2']:.1%}" in result["advice_text"]


# -- HardTokenShare ------------------------------------------------------------------------------------
def _fakes(tmp_path):
    logged = []
    logger = SimpleNamespace(log_metrics=lambda m, step: logged.append((m, step)))
    trainer = SimpleNamespace(world_size=1, is_global_zero=True, loggers=[logger], current_epoch=0, global_step=3,
                              log_dir=str(tmp_path), default_root_dir=str(tmp_path), callback_metrics={})
    return trainer, SimpleNamespace(device=torch.device("cpu")), logged


def test_token_share_counts(tmp_path):
    trainer, module, logged = _fakes(tmp_path)
    cb = HardTokenShare(threshold=0.2)
    cb.setup(trainer, module, "fit")  # Lightning calls setup first: the run directory is resolved there
    cb.on_train_epoch_start(trainer, module)
    p = torch.tensor([[0.9, 0.1, 0.5, 0.01], [0.3, 0.19, 0.99, 0.5]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    module.last_train_tokens = TokenLosses(-p.log(), mask)  # above 0.2 among supervised: 0.9, 0.5, 0.3 of 5
    cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_batch_end(trainer, module, None, None, 0)  # the same micro-batch's object: counted once
    module.last_train_tokens = (torch.tensor(2), torch.tensor(5))  # already counted by the module
    cb.on_train_batch_end(trainer, module, None, None, 1)
    cb.on_train_epoch_end(trainer, module)
    assert logged == [({"train/token_share_p_gt_0.2": pytest.approx(0.5)}, 3)]
    assert float(trainer.callback_metrics["train/token_share_p_gt_0.2"]) == pytest.approx(0.5)
    saved = json.loads((tmp_path / "token_share.json").read_text())
    assert saved["history"] == [{"epoch": 0, "step": 3, "share": 0.5, "n_tokens": 10}]


def test_token_share_without_stats_logs_nothing(tmp_path):
    trainer, module, logged = _fakes(tmp_path)
    cb = HardTokenShare()
    cb.on_train_batch_end(trainer, module, None, None, 0)
    cb.on_train_epoch_end(trainer, module)
    assert logged == [] and not (tmp_path / "token_share.json").exists()


def test_token_share_in_a_fit(tmp_path, tiny_dir):
    from talr.cli import main

    cfg = fit_config(tmp_path, tiny_dir, "synthetic", method_args={"baseline_eval": False, "generate_in_eval": False},
                     task={"max_examples": {"train": 4, "validation": 2, "test": 2}},
                     data={"max_length": 384, "batch_size": 2},
                     trainer={"max_steps": -1, "max_epochs": 2, "limit_val_batches": 0,
                              "callbacks": [{"class_path": "talr.callbacks.token_share.HardTokenShare"}]})
    main(["fit", "--config", str(cfg)])
    files = list((tmp_path / "run").rglob("token_share.json"))
    assert len(files) == 1
    history = json.loads(files[0].read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1] and [h["step"] for h in history] == [2, 4]
    assert all(0.0 <= h["share"] <= 1.0 for h in history)
    n_supervised = history[0]["n_tokens"]
    assert n_supervised > 0 and history[1]["n_tokens"] == n_supervised  # every training token, every epoch
