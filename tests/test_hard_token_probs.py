"""Figure 3a's callback (talr.callbacks.HardTokenProbs): the base model's hardest tokens, followed in training.

At train start the recorded p equal a direct forward pass of the base model on the same examples and they are
the lowest supervised p there; training on those examples raises them; two FSDP2 ranks record the same numbers
as one unsharded process (every rank runs the forward, no rank waits in a collective alone).
"""

from __future__ import annotations

import datetime
import json
import os
import socket

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from talr.callbacks import HardTokenProbs
from talr.data.datamodule import DomainDataModule
from talr.data.encoding import Collator
from talr.methods import SFT
from talr.tasks.medcalc import MedCalc

EPOCHS = 6


def fit(model_dir: str, root: str, devices: int = 1, every_n_steps: int = 0, lr: float = 2e-2) -> DomainDataModule:
    from lightning.pytorch.strategies import ModelParallelStrategy

    task = MedCalc(source="synthetic", format="label", max_examples={"train": 4, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=model_dir, max_length=512, batch_size=4 // devices)
    module = SFT(pretrained=model_dir, lr=lr, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False)
    strategy = "auto"
    if devices > 1:  # SFT.configure_model shards the layers with FSDP2 under this strategy
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                         timeout=datetime.timedelta(seconds=180))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=EPOCHS, logger=False,
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[HardTokenProbs(num_examples=4, num_tokens=6, every_n_steps=every_n_steps)])
    trainer.fit(module, dm)
    return dm


def direct_probs(model_dir, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    batch = Collator(0)(examples)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    probs = logits.double().softmax(-1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return probs, batch["labels"][:, 1:] != -100, batch["input_ids"]


def test_start_probs_are_the_base_models_lowest_and_rise_in_training(tmp_path, tiny_model_dir):
    dm = fit(str(tiny_model_dir), str(tmp_path), every_n_steps=2)
    record = json.loads((tmp_path / "hard_token_probs.json").read_text())
    pairs, history = record["pairs"], record["history"]
    assert len(pairs) == 6 and [h["step"] for h in history] == list(range(0, EPOCHS + 1))  # 1 step per epoch
    probs, mask, ids = direct_probs(tiny_model_dir, dm.examples["train"][:4])
    start = history[0]["p"]
    for q, p in zip(pairs, start):
        assert mask[q["example"], q["position"]]
        assert q["token_id"] == int(ids[q["example"], q["position"] + 1])
        assert p == pytest.approx(float(probs[q["example"], q["position"]]), rel=1e-4)
    # they are the 6 lowest supervised p of the base model
    lowest = torch.sort(probs[mask]).values[:6]
    torch.testing.assert_close(torch.sort(torch.tensor(start, dtype=torch.float64)).values, lowest, rtol=1e-4, atol=0)
    # training on exactly these examples makes the hard tokens likelier (by orders of magnitude here)
    assert history[-1]["mean_p"] > 10 * history[0]["mean_p"]
    assert all(b > a for a, b in zip(history[0]["p"], history[-1]["p"]))


def test_bad_arguments():
    with pytest.raises(ValueError):
        HardTokenProbs(num_tokens=0)


def _worker(rank: int, port: int, model_dir: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    fit(model_dir, root, devices=2, every_n_steps=1)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_fsdp2_ranks_record_what_one_process_records(tmp_path, tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_worker, args=(port, str(tiny_model_dir), str(tmp_path / "fsdp")), nprocs=2,
                                 start_method="spawn", join=False)
    deadline = 600
    while not context.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process run did not finish in 600 s (a rank stuck in a collective?)")
    fit(str(tiny_model_dir), str(tmp_path / "single"), every_n_steps=1)
    sharded = json.loads((tmp_path / "fsdp" / "hard_token_probs.json").read_text())
    single = json.loads((tmp_path / "single" / "hard_token_probs.json").read_text())
    assert sharded["pairs"] == single["pairs"]
    assert len(sharded["history"]) == len(single["history"]) == EPOCHS + 1
    for a, b in zip(sharded["history"], single["history"]):
        assert a["step"] == b["step"]
        assert a["p"] == pytest.approx(b["p"], rel=2e-3)
