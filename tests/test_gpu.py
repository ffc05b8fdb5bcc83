"""GPU-only checks (skipped without CUDA): a bf16-mixed training step, FSDP1 strategy construction, FSDP2
sharding under ModelParallelStrategy on one GPU, and the chunked loss's real peak-memory saving."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _trainer(tmp_path, **kwargs):
    import lightning.pytorch as L

    args = dict(accelerator="gpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path))
    return L.Trainer(**{**args, **kwargs})


def _data(model_dir, batch_size=2):
    from talr.data.datamodule import DomainDataModule
    from talr.tasks.medcalc import MedCalc

    task = MedCalc(source="synthetic", format="cot", max_examples={"train": 4, "validation": 1, "test": 1})
    return DomainDataModule(task=task, tokenizer=str(model_dir), max_length=1024, batch_size=batch_size)


def test_bf16_mixed_training_step(tmp_path, tiny_model_dir):
    from talr.methods import TALR

    model = TALR(pretrained=str(tiny_model_dir), lr=1e-3, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False)
    trainer = _trainer(tmp_path, precision="bf16-mixed")
    trainer.fit(model, _data(tiny_model_dir))
    assert trainer.global_step == 2
    assert model.model.device.type == "cuda"
    assert all(torch.isfinite(p).all() for p in model.model.parameters())
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss), loss


def test_fsdp1_strategy_constructs():
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, activation_checkpointing_policy={LlamaDecoderLayer},
                            sharding_strategy="FULL_SHARD", state_dict_type="full")
    assert strategy.sharding_strategy.name == "FULL_SHARD"


def test_model_parallel_strategy_one_gpu_bf16(tmp_path, tiny_model_dir):
    """FSDP2 through ModelParallelStrategy on one GPU (NCCL, world 1), bf16 compute from FSDP2's own mixed precision
    (`fsdp_mixed_precision`; the module shards in configure_model, so a test must not re-shard: sharding is
    idempotent and a second call's options are ignored), fp32 sharded weights, activation checkpointing, chunked loss."""
    import lightning.pytorch as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from talr.methods import SFT

    class ComputeDtype(L.Callback):
        def __init__(self):
            self.seen = set()

        def on_train_start(self, trainer, pl_module):
            q_proj = pl_module.model.model.layers[0].self_attn.q_proj
            q_proj.register_forward_pre_hook(lambda module, args: self.seen.add(module.weight.dtype))

    model = SFT(pretrained=str(tiny_model_dir), lr=1e-3, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False,
                fsdp_mixed_precision="bf16", gradient_checkpointing=True, loss_chunk_size=64)
    probe = ComputeDtype()
    trainer = _trainer(tmp_path, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                       callbacks=[probe])
    trainer.fit(model, _data(tiny_model_dir))
    assert trainer.global_step == 2
    assert any(hasattr(p, "full_tensor") for p in model.model.parameters())
    assert probe.seen == {torch.bfloat16}  # computed in bf16 ...
    assert {p.dtype for p in model.model.parameters()} == {torch.float32}  # ... from fp32 sharded weights
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_chunked_loss_cuda_matches_and_saves_memory():
    from talr.ops import chunked_token_losses

    torch.manual_seed(0)
    n, h, v = 4096, 1024, 65536
    hidden = torch.randn(n, h, device="cuda", requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") * 0.02).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[:1000] = -100
    up = torch.rand(n, device="cuda")

    def run(fn):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = fn()
        (losses * up).sum().backward()
        torch.cuda.synchronize()
        return losses.detach(), hidden.grad.clone(), weight.grad.clone(), torch.cuda.max_memory_allocated() - base

    ref = run(lambda: F.cross_entropy((hidden @ weight.T).float(), labels, reduction="none"))
    out = run(lambda: chunked_token_losses(hidden, weight, labels, 1024))
    torch.testing.assert_close(out[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(out[1:3], ref[1:3]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    assert out[3] < 0.5 * ref[3], (out[3], ref[3])
