"""FSDP2 (`ModelParallelStrategy`, 2 gloo processes on CPU) beyond the training step: the HF export gathers
the sharded weights into one plain directory (also LoRA: adapter + merged model), the general-eval callback
evaluates a gathered copy with the trained weights, the code-length drift runs on the sharded model, and
sharded (distributed) checkpoints resume to the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from talr.callbacks import ExportHF
from talr.data.datamodule import DomainDataModule
from talr.distributed import is_sharded, unsharded_copy
from talr.general import CodeLengthDriftCallback, GeneralEvalCallback
from talr.methods import SFT, LoRA
from talr.tasks.medcalc import MedCalc

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
PROBE_IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 8]])


class ProbeEval(GeneralEvalCallback):
    """Records what the evaluated model computes (logits on fixed ids) before the real lm-eval run."""

    def run_eval(self, model, tokenizer, **kwargs):
        with torch.no_grad():
            self.probe = {"logits": model(input_ids=PROBE_IDS.to(model.device)).logits.cpu(), "sharded": is_sharded(model)}
        return super().run_eval(model, tokenizer, **kwargs)


class SGD:
    """Plain SGD for sharded-vs-unsharded comparisons: AdamW's first step is lr·sign(g) for tiny gradients,
    so float-rounding differences between the two layouts flip whole updates (the exactness of the
    gradients themselves is tests/test_fsdp2.py's subject). Resume tests keep AdamW (its sharded state)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.trainable_parameters(), lr=0.5)


class SGDSFT(SGD, SFT): ...
class SGDLoRA(SGD, LoRA): ...


class Collect(L.Callback):
    """After training (and after ExportHF), gather everything the test compares; rank 0 saves it."""

    def on_train_end(self, trainer, pl_module):
        copy = unsharded_copy(pl_module.model)  # collective under FSDP2
        if not trainer.is_global_zero:
            return
        evals = [cb for cb in trainer.callbacks if isinstance(cb, ProbeEval)]
        result = {"weights": {n: p.detach().clone() for n, p in copy.state_dict().items()},
                  "sharded": is_sharded(pl_module.model),
                  "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}}
        if evals:
            result["probe"] = evals[0].probe
        torch.save(result, os.environ["TALR_PROBE"])


def run(model_dir: str, root: str, devices: int, method: str, steps: int, evaluate: bool, ckpt: str | None,
        optimizer: str) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    # one step sees the same 4 sequences sharded or not only when there are 4 (the samplers split differently)
    rows = 4 if steps == 1 else 12
    task = MedCalc(source="synthetic", format="label", max_examples={"train": rows, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=model_dir, max_length=512, batch_size=4 // devices)
    cls, extra = (LoRA, {"r": 4, "lora_alpha": 8}) if method == "lora" else (SFT, {})
    if optimizer == "sgd":
        cls = {LoRA: SGDLoRA, SFT: SGDSFT}[cls]
    model = cls(pretrained=model_dir, lr=1e-2, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False, **extra)
    callbacks = [ExportHF(dirpath=f"{root}/hf")]
    if evaluate:
        callbacks += [ProbeEval(tasks=["ifeval"], limit=1, max_gen_toks=2, data_dir=str(DATA_DIR), at_start=False,
                                every_n_epochs=0),
                      CodeLengthDriftCallback(every_n_steps=1, num_prompts=2, max_new_tokens=4)]
    callbacks += [ModelCheckpoint(dirpath=f"{root}/ckpt", every_n_train_steps=2, save_top_k=-1), Collect()]
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=callbacks)
    trainer.fit(model, dm, ckpt_path=ckpt)


def _worker(rank: int, port: int, probe: str, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", TALR_PROBE=probe)
    torch.set_num_threads(1)
    run(*args)


def launch(root: Path, model_dir, devices: int, method: str = "sft", steps: int = 1, evaluate: bool = False,
           ckpt: str | None = None, optimizer: str = "sgd") -> dict:
    probe = root / "probe.pt"
    args = (str(model_dir), str(root), devices, method, steps, evaluate, ckpt, optimizer)
    if devices == 1:
        os.environ["TALR_PROBE"] = str(probe)
        try:
            run(*args)
        finally:
            del os.environ["TALR_PROBE"]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_worker, args=(port, str(probe), *args), nprocs=2, start_method="spawn")
    return torch.load(probe, weights_only=True)


def assert_same(a: dict, b: dict, rtol=2e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def test_export_eval_and_drift_under_fsdp2(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fsdp = launch(tmp_path / "fsdp", tiny_model_dir, 2, evaluate=True)
    single = launch(tmp_path / "single", tiny_model_dir, 1, evaluate=True)
    assert fsdp["sharded"] and not single["sharded"]

    # the export is a plain HF directory holding exactly the gathered weights
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "hf")
    assert type(exported).__name__ == "LlamaForCausalLM" and exported.config.architectures == ["LlamaForCausalLM"]
    assert AutoTokenizer.from_pretrained(tmp_path / "fsdp" / "hf").chat_template
    exported_sd = exported.state_dict()
    for name, value in fsdp["weights"].items():
        torch.testing.assert_close(exported_sd[name], value, rtol=0, atol=0)
    # ... and equals the unsharded run's weights (same data, same step)
    assert_same(fsdp["weights"], single["weights"])
    assert any(not torch.equal(v, AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()[k])
               for k, v in fsdp["weights"].items())

    # the general eval ran on an unsharded copy carrying the trained weights
    assert fsdp["probe"]["sharded"] is False
    with torch.no_grad():
        torch.testing.assert_close(fsdp["probe"]["logits"], exported(input_ids=PROBE_IDS).logits, rtol=1e-5, atol=1e-5)
    assert "general/ifeval/prompt_level_strict_acc" in fsdp["metrics"] and "general/score" in fsdp["metrics"]
    # the drift, computed by every rank on the sharded model, matches the unsharded run's
    assert fsdp["metrics"]["drift/nll_delta"] != 0
    assert fsdp["metrics"]["drift/nll_delta"] == pytest.approx(single["metrics"]["drift/nll_delta"], rel=1e-3, abs=1e-5)


def test_lora_export_under_fsdp2(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    fsdp = launch(tmp_path / "fsdp", tiny_model_dir, 2, method="lora")
    single = launch(tmp_path / "single", tiny_model_dir, 1, method="lora")
    assert (tmp_path / "fsdp" / "hf" / "adapter" / "adapter_config.json").exists()
    merged = {k: v for k, v in AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "hf").state_dict().items()}
    merged_single = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "hf").state_dict())
    assert not any("lora" in k for k in merged)
    assert_same(merged, merged_single)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.allclose(merged[k], base[k]) for k in merged if "q_proj" in k)  # the adapters were merged


def test_sharded_checkpoint_resumes_exactly(tmp_path, tiny_model_dir):
    straight = launch(tmp_path / "straight", tiny_model_dir, 2, steps=3, optimizer="adamw")
    ckpt = tmp_path / "straight" / "ckpt" / "epoch=0-step=2.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    resumed = launch(tmp_path / "resumed", tiny_model_dir, 2, steps=3, ckpt=str(ckpt), optimizer="adamw")
    assert_same(resumed["weights"], straight["weights"], rtol=1e-5, atol=1e-7)


def test_fsdp1_is_refused_before_training():
    """FSDP1 cannot gather `pl_module.model` on its own: the callbacks say so at setup, naming the fix."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy())
    for callback in (ExportHF(), GeneralEvalCallback(tasks=["ifeval"]), CodeLengthDriftCallback()):
        with pytest.raises(ValueError, match="does not support FSDPStrategy.*ModelParallelStrategy"):
            callback.setup(trainer, None, "fit")
    ExportHF().setup(SimpleNamespace(strategy=object()), None, "fit")  # anything else passes
