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
from talr.distributed import full_state_dict, shard_model
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


class PL2Moved(PL2):
    """L2-to-init with the weights moved off θ0 by a fixed δ before the step (θ0 taken first), so the coupled
    penalty has a gradient to add; the decoupled pull acts after the step either way."""

    def on_train_start(self):
        super().on_train_start()
        from torch.distributed.tensor import DTensor, distribute_tensor

        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.model.parameters():
                delta = 0.01 * torch.randn(p.shape, generator=g)  # the same full tensor on every rank
                p.add_(distribute_tensor(delta, p.device_mesh, p.placements) if isinstance(p, DTensor) else delta)


class PNaN(ShardedProbe, SFT):
    """A non-finite gradient in rank 1's shard only."""

    def finish_gradient(self):  # the NaN enters before the step's (fused) rescale and finiteness check
        if self.trainer.global_rank == 1:
            grad = next(p.grad for p in self.model.parameters() if p.grad is not None)
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")
        super().finish_gradient()

    def on_train_end(self):
        self.result["skipped"] = self.skipped_steps
        super().on_train_end()


CASES = {
    "sft": (PSFT, {}),
    "talr": (PTALR, {}),
    "flow": (PFLOW, {"flow_cache": None}),
    "l2": (PL2, {"l2_lambda": 50.0}),
    "l2-sum": (PL2Moved, {"l2_lambda": 1.0, "l2_form": "sum"}),
    "l2-decoupled": (PL2Moved, {"l2_lambda": 0.5, "l2_form": "decoupled"}),  # lr·λ = 0.25 of the deviation
    "nan": (PNaN, {"nonfinite": "skip"}),
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


@pytest.mark.parametrize("case,chunk", [("sft", 0), ("talr", 0), ("flow", 0), ("l2", 0), ("l2-sum", 0), ("l2-decoupled", 0),
                                        ("talr", 16), ("flow", 16)],
                         ids=["sft", "talr", "flow", "l2", "l2-sum", "l2-decoupled", "talr-chunked", "flow-chunked"])
def test_sharded_equals_unsharded(tmp_path, tiny_model_dir, case, chunk):
    single = unsharded(tmp_path, tiny_model_dir, case, chunk)
    fsdp = sharded(tmp_path, tiny_model_dir, case, chunk)
    assert fsdp["sharded"] and not single["sharded"]
    assert fsdp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert_same(fsdp["grads"], single["grads"], "grad")
    assert_same(fsdp["weights"], single["weights"], "updated weight")
    assert any(float(g.abs().max()) > 0 for g in single["grads"].values())  # so the weights moved by LR·grad


def test_nonfinite_gradient_in_one_shard_skips_the_step_on_every_rank(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    fsdp = sharded(tmp_path, tiny_model_dir, "nan", 0)
    assert fsdp["skipped"] == 1  # rank 0's own shard was finite
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for k, v in fsdp["weights"].items():  # full tensors: neither rank's shard moved
        torch.testing.assert_close(v, initial[k], rtol=0, atol=0)


# --- shard_model options, without Lightning -----------------------------------------------------------

def _batch():
    """4 sequences with unequal prompt, response and padding lengths; rank r gets sequences 2r, 2r+1."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (4, 24), generator=g)
    attn = torch.ones_like(ids)
    labels = ids.clone()
    for i, (prompt, length) in enumerate([(5, 24), (9, 14), (3, 20), (11, 17)]):
        attn[i, length:] = 0
        labels[i, :prompt] = -100
        labels[i, length:] = -100
    return ids, attn, labels


def _talr_step_grads(model, ids, attn, labels, sync):
    """d(Σ w ℓ / N)/dθ with TALR weights (dynamic τ, simplex) and the global N; FSDP averages over ranks,
    so the sharded gradient is rescaled by world_size like `SFT.on_before_optimizer_step` does."""
    from talr.losses import talr_weights, weighted_token_loss_sum

    losses, mask = causal_lm_token_losses(model, ids, attn, labels, chunk_size=8)
    weights = talr_weights(losses.detach(), mask, sync=sync)
    n = mask.sum().double()
    world = dist.get_world_size() if sync else 1
    if sync:
        dist.all_reduce(n)
    weighted_token_loss_sum(losses, mask, weights).backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:  # frozen (LoRA's base)
            continue
        grads[name.replace("_checkpoint_wrapped_module.", "")] = _full(p.grad) * (world / float(n))
    return grads


def _options_worker(rank: int, init_file: str, model_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (2,))
        ids, attn, labels = _batch()
        mine = slice(2 * rank, 2 * rank + 2)
        load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()  # noqa: E731
        ref = _talr_step_grads(load(), ids, attn, labels, sync=False)

        def check(model, rtol=2e-4, atol=1e-6, ref=ref):
            got = _talr_step_grads(model, ids[mine], attn[mine], labels[mine], sync=True)
            assert got.keys() == ref.keys()
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")

        # activation checkpointing (transformers' own, non-reentrant), layers resharded after forward
        model = shard_model(load(), mesh, activation_checkpointing=True)
        assert model.model.gradient_checkpointing and model.model.layers[0].gradient_checkpointing
        assert shard_model(model, mesh) is model  # idempotent
        full = full_state_dict(model)  # export: the unsharded weights on rank 0, as the plain model names them
        plain = load().state_dict()
        if rank == 0:
            assert full.keys() == plain.keys(), set(full) ^ set(plain)
            assert all(torch.equal(full[k], plain[k]) for k in plain)
            model.save_pretrained(f"{init_file}.export", state_dict=full)
            again = AutoModelForCausalLM.from_pretrained(f"{init_file}.export").state_dict()
            assert all(torch.equal(again[k], plain[k]) for k in plain)
        check(model)
        # checkpoint_wrapper fallback for models without transformers' checkpointing
        model = load()
        model.supports_gradient_checkpointing = False
        check(shard_model(model, mesh, activation_checkpointing=True, reshard_after_forward=False))
        # a root sharded by hand that reshards after forward: the loss gathers the output layer again
        model = load()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        check(fully_shard(model, mesh=mesh, reshard_after_forward=True))
        # LoRA (peft wrapper): layers found through get_base_model(); only the adapters have gradients
        from peft import LoraConfig, get_peft_model

        def lora():
            torch.manual_seed(0)
            return get_peft_model(load(), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                                                     target_modules=["q_proj", "v_proj"]))

        lora_ref = _talr_step_grads(lora(), ids, attn, labels, sync=False)
        assert lora_ref and all("lora_" in k for k in lora_ref)
        check(shard_model(lora(), mesh), ref=lora_ref)
        # bf16 compute, fp32 shards and reduction: close to the fp32 gradient (bf16-level tolerance)
        model = shard_model(load(), mesh, mixed_precision="bf16")
        got = _talr_step_grads(model, ids[mine], attn[mine], labels[mine], sync=True)
        for k in ref:
            assert got[k].dtype == torch.float32
            cos = torch.nn.functional.cosine_similarity(got[k].flatten(), ref[k].flatten(), dim=0)
            assert cos > 0.99, (k, float(cos))
    finally:
        dist.destroy_process_group()


def test_shard_model_options_keep_gradients_exact(tmp_path, tiny_model_dir):
    mp.start_processes(_options_worker, args=(str(tmp_path / "init"), str(tiny_model_dir)), nprocs=2,
                       start_method="spawn")


def test_shard_model_argument_errors(tokenizer):
    from conftest import make_tiny_model
    from talr.distributed import data_parallel_mesh, decoder_layers

    model = make_tiny_model(tokenizer)
    layers = decoder_layers(model)
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 2
    with pytest.raises(ValueError, match="no module of class"):
        decoder_layers(model, ["NoSuchLayer"])

    class Mesh:  # stands in for a 2-D DeviceMesh with tensor parallelism
        mesh_dim_names = ("data_parallel", "tensor_parallel")
        ndim = 2

        def __getitem__(self, name):
            return type("Sub", (), {"size": lambda self: 2})()

    with pytest.raises(NotImplementedError):
        data_parallel_mesh(Mesh())
    with pytest.raises(ValueError, match="mixed_precision"):
        shard_model(model, Mesh(), mixed_precision="fp8")
