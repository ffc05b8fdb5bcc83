"""FLOW under FSDP2 (2 gloo processes, `ModelParallelStrategy`): the initial-model pass does not hang when
the training set does not split evenly, gives the one-process weights, and one cache decision (rank 0's)
holds for every rank; the cache key changes with everything that changes the weights."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
from gloo_spawn import PG_TIMEOUT, spawn

from talr.data.datamodule import DomainDataModule
from talr.methods import FLOW
from talr.tasks.medcalc import MedCalc

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
ROWS, FLOW_BATCH = 5, 2  # rank 0 scores 3 rows (2 batches), rank 1 scores 2 (1 batch) before padding


class ProbedFLOW(FLOW):
    """Saves each rank's FLOW weights right after they are computed or loaded."""

    def __init__(self, *args, probe: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.probe = probe

    def on_fit_start(self) -> None:
        super().on_fit_start()
        torch.save({"weights": self.flow_weights.cpu(), "tau": self.flow_tau}, f"{self.probe}.{self.trainer.global_rank}")


def fit_flow(model_dir: str, root: str, devices: int, flow_cache: str | None, cache_roots: list[str] | None = None) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    if cache_roots:  # a node-local cache: each rank its own $TALR_CACHE
        os.environ["TALR_CACHE"] = cache_roots[int(os.environ.get("RANK", 0))]
    task = MedCalc(source="synthetic", format="cot", max_examples={"train": ROWS, "validation": 1, "test": 1})
    dm = DomainDataModule(task=task, tokenizer=model_dir, max_length=1024, batch_size=1)
    model = ProbedFLOW(pretrained=model_dir, lr=1e-3, warmup_ratio=0.0, baseline_eval=False, generate_in_eval=False,
                       flow_batch_size=FLOW_BATCH, flow_cache=flow_cache, probe=f"{root}/probe-{devices}")
    strategy = (ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1, timeout=PG_TIMEOUT)
                if devices > 1 else "auto")
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, limit_train_batches=1, logger=False,
        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(model, dm)


def probes(root, devices: int) -> list[dict]:
    return [torch.load(f"{root}/probe-{devices}.{r}", weights_only=True) for r in range(devices)]


@pytest.mark.slow  # 2 processes
def test_uneven_split_does_not_hang_and_matches_one_process(tmp_path, tiny_model_dir):
    fit_flow(str(tiny_model_dir), str(tmp_path), 1, None)
    (single,) = probes(tmp_path, 1)
    spawn(fit_flow, str(tiny_model_dir), str(tmp_path), 2, None, timeout=PG_TIMEOUT.total_seconds() + 180)
    ranks = probes(tmp_path, 2)
    assert single["weights"].shape == (ROWS,) and len(set(single["weights"].tolist())) == ROWS
    for got in ranks:
        torch.testing.assert_close(got["weights"], single["weights"], rtol=1e-5, atol=1e-7)
        assert got["tau"] == pytest.approx(single["tau"], rel=1e-5)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])


@pytest.mark.slow  # 2 processes
def test_rank_zero_decides_the_cache_for_every_rank(tmp_path, tiny_model_dir):
    """Only rank 0's node has the cache file: rank 1 must not start computing (a collective) on its own."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    fit_flow(str(tiny_model_dir), str(tmp_path), 1, str(node0 / "flow"))  # fills node 0's cache
    (cached,) = list((node0 / "flow").glob("*.pt"))
    marked = torch.linspace(0.1, 0.9, ROWS)  # weights no computation would give: proof they were loaded
    torch.save({"weights": marked, "tau": torch.tensor(0.125)}, cached)
    node1.mkdir()
    spawn(fit_flow, str(tiny_model_dir), str(tmp_path), 2, "default", [str(node0), str(node1)],
          timeout=PG_TIMEOUT.total_seconds() + 180)
    for got in probes(tmp_path, 2):
        assert torch.equal(got["weights"], marked) and got["tau"] == 0.125
    assert not list(node1.rglob("*.pt"))


def test_cache_key_changes_with_what_changes_the_weights(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub.constants

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    module = FLOW(pretrained=str(model_dir), flow_cache=str(tmp_path / "flow"))
    module.configure_model()
    datamodule = SimpleNamespace(max_length=256, overlong="truncate", chat_template_kwargs={})
    module._trainer = SimpleNamespace(precision="32-true", datamodule=datamodule)
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    base = module._cache_path(examples)
    assert base == module._cache_path(examples)  # deterministic

    def changed(undo, **what) -> bool:
        path = module._cache_path(what.get("examples", examples))
        undo()
        assert module._cache_path(examples) == base
        return path != base

    hp = module.hparams
    for name, value in [("dtype", "bfloat16"), ("attn_implementation", "eager"), ("pretrained", "org/other")]:
        old = hp[name]
        hp[name] = value
        assert changed(lambda name=name, old=old: hp.__setitem__(name, old)), name
    module._trainer.precision = "bf16-mixed"
    assert changed(lambda: setattr(module._trainer, "precision", "32-true")), "precision"
    for name, value in [("max_length", 128), ("overlong", "skip"), ("chat_template_kwargs", {"enable_thinking": False})]:
        old = getattr(datamodule, name)
        setattr(datamodule, name, value)
        assert changed(lambda name=name, old=old: setattr(datamodule, name, old)), name
    assert changed(lambda: None, examples=[examples[0], {"input_ids": [4, 6], "labels": [-100, 6]}]), "token ids"
    assert changed(lambda: None, examples=[examples[0], {"input_ids": [4, 5], "labels": [4, 5]}]), "labels"
    # the local weights' identity: rewritten in place (same path, new modification time)
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert changed(lambda: os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))), "local weights"
    # not the loss chunk size: chunked and full-logit losses are the same
    hp["loss_chunk_size"] = 16
    assert not changed(lambda: hp.__setitem__("loss_chunk_size", 0)), "loss_chunk_size"

    # a hub id: keyed by the commit the local hub cache resolves the default branch to
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    hp["pretrained"] = "org/model"
    unresolved = module._cache_path(examples)
    repo = hub / "models--org--model"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    keys = []
    for commit in ("a" * 40, "b" * 40):
        (repo / "refs" / "main").write_text(commit)
        keys.append(module._cache_path(examples))
    assert len({unresolved, *keys}) == 3
    from talr.modeling import model_fingerprint

    (repo / "refs" / "v1").write_text("a" * 40)  # another revision: its own commit
    assert model_fingerprint("org/model", "v1") == f"org/model@{'a' * 40}" != model_fingerprint("org/model")
    assert model_fingerprint("org/model", "v2") == "org/model@v2?"  # not in the hub cache: id and revision
