"""FSDP2 keeps every method exact: a real Lightning Trainer with `ModelParallelStrategy(data_parallel_size=2)`
on CPU (gloo, 2 processes, 2 sequences each) gives the same loss, the same normalised gradient and the same
SGD-updated weights (compared as `full_tensor()`) as one unsharded process on the 4 sequences of unequal
lengths — for SFT, TALR (τ and simplex normaliser synced across ranks), FLOW (per-sample weights) and
L2-to-init (θ0 kept as DTensor shards) — with the plain and the chunked per-token loss.

The processes are started here (spawn) with the torchrun environment variables set, so Lightning sees an
external launcher and each process runs the same `Trainer.fit`.
"""

from __future__ import annotations

import os
import socket

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from talr.data.datamodule import DomainDataModule
from talr.distributed import shard_model
from talr.methods import FLOW, SFT, TALR, L2Init
from talr.ops import causal_lm_token_losses
from talr.tasks.medcalc import MedCalc

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
LR = 0.5


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


class ShardedProbe:
    """What the proposed `SFT` changes do (shard under ModelParallelStrategy; optional chunked loss), plus
    plain SGD (its update is proportional to the gradient, unlike AdamW's first step) and probes of the
    global loss, the normalised gradients and the updated weights."""

    loss_chunk_size = 0

    def configure_model(self):
        super().configure_model()
        if self.device_mesh is not None:
            shard_model(self.model, self.device_mesh)

    def token_losses(self, batch):
        if not self.loss_chunk_size:
            return super().token_losses(batch)
        return causal_lm_token_losses(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      chunk_size=self.loss_chunk_size)

    def configure_optimizers(self):
        return torch.optim.SGD(self.trainable_parameters(), lr=LR)

    def training_step(self, batch, batch_idx):
        loss_sum = super().training_step(batch, batch_idx)
        self._probe = torch.stack([loss_sum.detach().double(), (batch["labels"][:, 1:] != -100).sum().double()])
        return loss_sum

    def after_gradient_normalized(self):
        super().after_gradient_normalized()
        totals = self.trainer.strategy.reduce(self._probe.clone(), reduce_op="sum")  # identity on one process
        grads = {n: _full(p.grad) for n, p in self.model.named_parameters() if p.grad is not None}  # collective
        self.result = {"loss": float(totals[0] / totals[1]), "grads": grads}

    def on_train_end(self):
        self.result["weights"] = {n: _full(p) for n, p in self.model.named_parameters()}  # collective
        self.result["sharded"] = any(hasattr(p, "full_tensor") for p in self.model.parameters())
        if self.trainer.is_global_zero and os.environ.get("TALR_PROBE"):
            torch.save(self.result, os.environ["TALR_PROBE"])


class PSFT(ShardedProbe, SFT): ...
class PTALR(ShardedProbe, TALR): ...
class PFLOW(ShardedProbe, FLOW): ...
class PL2(ShardedProbe, L2Init): ...


CASES = {
    "sft": (PSFT, {}),
    "talr": (PTALR, {}),
    "flow": (PFLOW, {"flow_cache": None}),
    "l2": (PL2, {"l2_lambda": 50.0}),
}


def run(model_dir: str, case: str, chunk: int, devices: int, root: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    cls, args = CASES[case]
    cls.loss_chunk_size = chunk
    task = MedCalc(source="synthetic", format="cot", max_examples={"train": 4, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=model_dir, max_length=1024, batch_size=4 // devices)
    model = cls(pretrained=model_dir, lr=LR, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False, **args)
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, dm)


def _worker(rank: int, port: int, probe: str, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", TALR_PROBE=probe)
    torch.set_num_threads(1)
    run(*args)


def sharded(tmp_path, model_dir, case, chunk) -> dict:
    probe = tmp_path / f"sharded-{case}-{chunk}.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(probe), str(model_dir), case, chunk, 2, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    return torch.load(probe, weights_only=True)


def unsharded(tmp_path, model_dir, case, chunk) -> dict:
    probe = tmp_path / f"single-{case}-{chunk}.pt"
    os.environ["TALR_PROBE"] = str(probe)
    try:
        run(str(model_dir), case, chunk, 1, str(tmp_path))
    finally:
        del os.environ["TALR_PROBE"]
    return torch.load(probe, weights_only=True)


def assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys() and a, what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-4, atol=1e-6, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("chunk", [0, 16], ids=["plain", "chunked"])
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_equals_unsharded(tmp_path, tiny_model_dir, case, chunk):
    single = unsharded(tmp_path, tiny_model_dir, case, chunk)
    fsdp = sharded(tmp_path, tiny_model_dir, case, chunk)
    assert fsdp["sharded"] and not single["sharded"]
    assert fsdp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert_same(fsdp["grads"], single["grads"], "grad")
    assert_same(fsdp["weights"], single["weights"], "updated weight")
    assert any(float(g.abs().max()) > 0 for g in single["grads"].values())  # so the weights moved by LR·grad
