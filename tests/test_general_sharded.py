"""Data-parallel general evaluation (talr.general.sharded): 2 gloo processes, each with the full tiny model,
evaluate their share of GSM8K (5-shot) and IFEval and return exactly what one process returns: the same per-task
metrics (standard errors included), the same prompt and generation for every document, the same general/score,
for an uneven split (5 documents over 2 ranks), without deadlock. Under FSDP2 every rank first gets a full
replica of the sharded model."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import SHARED_DATA, make_tiny_model, require

from talr.general import GeneralEvalCallback

TASKS = ["gsm8k", "ifeval"]
LIMIT = 5  # 3 documents on rank 0, 2 on rank 1


def _evaluate(model, tokenizer, data_dir: str, batch_size: int, data_parallel: bool) -> dict:
    from talr.general.evaluate import evaluate_general

    return evaluate_general(model, tokenizer, tasks=TASKS, limit=LIMIT, data_dir=data_dir, batch_size=batch_size,
                            max_gen_toks=12, log_samples=True, data_parallel=data_parallel)


def _comparable(result: dict) -> dict:
    samples = {task: [(s["doc_id"], s["filter"], s["arguments"], s["resps"], s["filtered_resps"],
                       {m: s[m] for m in s["metrics"]}) for s in rows] for task, rows in result["samples"].items()}
    return json.loads(json.dumps({"results": result["results"], "score": result["general/score"],
                                  "n_samples": result["n_samples"], "samples": samples}, default=str))


def _worker(rank: int, init_file: str, data_dir: str, batch_size: int, shard: bool, out: str) -> None:
    from talr.modeling import BUILTIN, load_tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=240))
    torch.set_num_threads(1)
    try:
        tokenizer = load_tokenizer(BUILTIN)
        model = make_tiny_model(tokenizer)
        if shard:
            from torch.distributed.device_mesh import init_device_mesh

            from talr.distributed import replicated_copy, shard_model

            model = replicated_copy(shard_model(model, init_device_mesh("cpu", (2,))))
            assert not any(hasattr(p, "full_tensor") for p in model.parameters())
        result = _evaluate(model, tokenizer, data_dir, batch_size, data_parallel=True)
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump(_comparable(result), f)
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path, batch_size: int, shard: bool = False) -> list[dict]:
    out = tmp_path / f"dp-{batch_size}-{shard}"
    mp.start_processes(_worker, args=(str(tmp_path / f"init-{batch_size}-{shard}"), str(SHARED_DATA), batch_size,
                                      shard, str(out)), nprocs=2, start_method="spawn")
    return [json.loads((tmp_path / f"{out.name}.rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def one_process(tokenizer):
    require(SHARED_DATA / "gsm8k" / "test.jsonl")
    torch.manual_seed(0)
    return _comparable(_evaluate(make_tiny_model(tokenizer), tokenizer, str(SHARED_DATA), 1, data_parallel=False))


@pytest.mark.slow
def test_two_ranks_give_one_process_results(tmp_path, one_process):
    ranks = _two_ranks(tmp_path, batch_size=1)
    assert ranks[0] == ranks[1]  # every rank returns the combined results
    got = ranks[0]
    assert got["n_samples"] == one_process["n_samples"]
    assert {t: n["effective"] for t, n in got["n_samples"].items()} == dict.fromkeys(TASKS, LIMIT)
    assert [s[0] for s in got["samples"]["gsm8k"]] == [0, 1, 2, 3, 4] * 2  # two filters, documents in order
    assert got["samples"] == one_process["samples"]  # prompts (5-shot draws), generations, per-document metrics
    assert got["results"] == one_process["results"]  # metric values and standard errors, bit for bit
    assert got["score"] == one_process["score"]


@pytest.mark.slow
def test_fsdp2_ranks_evaluate_a_full_replica_with_batches(tmp_path, tokenizer):
    """Sharded model -> a replica per rank; generation batches of 4, sorted by length by lm-eval."""
    require(SHARED_DATA / "gsm8k" / "test.jsonl")
    ranks = _two_ranks(tmp_path, batch_size=4, shard=True)
    assert ranks[0] == ranks[1]
    single = _comparable(_evaluate(make_tiny_model(tokenizer), tokenizer, str(SHARED_DATA), 4, data_parallel=False))
    assert ranks[0]["results"] == single["results"] and ranks[0]["score"] == single["score"]
    assert ranks[0]["samples"] == single["samples"]


def test_without_process_group_it_is_the_plain_evaluation(tokenizer):
    from talr.distributed import is_distributed
    from talr.general.sharded import broadcast_results, data_parallel_evaluation

    assert not is_distributed()
    lm = object()
    with data_parallel_evaluation(lm) as same:
        assert same is lm
    with pytest.raises(RuntimeError, match="no results"):
        broadcast_results(None)


def test_gathered_values_come_back_in_document_order():
    from talr.general.sharded import _in_document_order

    # rank 0 holds documents 0, 2, 4; rank 1 holds 1, 3 (lm-eval's split of 5 over 2)
    metrics = [{"t": {("acc", "none"): [0, 2, 4]}}, {"t": {("acc", "none"): [1, 3]}}]
    assert _in_document_order(metrics) == {"t": {("acc", "none"): [0, 1, 2, 3, 4]}}
    samples = [{"t": [{"doc_id": d, "filter": f} for f in ("a", "b") for d in (0, 2)]},
               {"t": [{"doc_id": d, "filter": f} for f in ("a", "b") for d in (1,)]}]
    merged = _in_document_order(samples)["t"]
    assert [(s["filter"], s["doc_id"]) for s in merged] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]


class RecordingDataParallel(GeneralEvalCallback):
    """GeneralEvalCallback whose lm-eval run is replaced by a record of who evaluated, and how."""

    def __init__(self, out_dir):
        super().__init__(tasks=["gsm8k"], every_n_epochs=None, every_n_steps=1)
        self.out_dir = out_dir

    def run_eval(self, model, tokenizer, data_parallel=False):
        sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
        with open(f"{self.out_dir}/ran_rank{dist.get_rank()}", "a") as f:
            f.write(f"{int(data_parallel)}{int(sharded)}")
        return {"results": {"gsm8k": {"exact_match_strict_match": 0.5}}, "general/score": 0.5, "wall_time_s": 0.0}

    def evaluate(self, trainer, pl_module, when):
        metrics = super().evaluate(trainer, pl_module, when)
        with open(f"{self.out_dir}/logged_rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps([trainer.global_step, metrics["general/score"]]) + "\n")
        return metrics


@pytest.mark.slow
def test_callback_evaluates_on_every_rank_without_a_broadcast(tokenizer, tmp_path):
    import lightning.pytorch as L
    from test_general_eval import TinyLM

    module = TinyLM(make_tiny_model(tokenizer, seed=5), tokenizer, [])
    data = torch.utils.data.TensorDataset(torch.randint(0, len(tokenizer), (8, 8)))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                        callbacks=[RecordingDataParallel(str(tmp_path))], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    for rank in (0, 1):  # start, step 1, step 2; each on the full (DDP: unsharded) model, data-parallel
        assert (tmp_path / f"ran_rank{rank}").read_text() == "10" * 3
        logged = [json.loads(line) for line in (tmp_path / f"logged_rank{rank}").read_text().splitlines()]
        assert logged == [[0, 0.5], [1, 0.5], [2, 0.5]]


@pytest.mark.slow
def test_talr_evaluate_under_torchrun_matches_one_process(tmp_path, tiny_model_dir):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    require(SHARED_DATA / "gsm8k" / "test.jsonl")
    root = Path(__file__).resolve().parents[1]
    args = ["-m", "talr", "evaluate", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--limit", "3",
            "--data-dir", str(SHARED_DATA), "--max-gen-toks", "8", "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {"one": [sys.executable, *args],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                    *args]}
    out = {}
    for name, cmd in runs.items():
        proc = subprocess.run([*cmd, "--output", str(tmp_path / f"{name}.json")], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert out["two"]["results"] == out["one"]["results"]
    assert out["two"]["general/score"] == out["one"]["general/score"]
    assert out["two"]["n_samples"]["gsm8k"]["effective"] == 3


def test_ifeval_ranks_score_each_document_from_one_process_random_state(tmp_path):
    """IFEval's letter-frequency checker draws a letter from the global `random` for documents 19 and 22; a rank
    that skipped the other rank's documents would draw other letters. `replaying_doc_iterator` replays them."""
    import random

    import lm_eval.tasks
    from lm_eval.api.task import Task
    from lm_eval.tasks.ifeval.instructions import LetterFrequencyChecker

    from talr.general.lm_tasks import make_task_manager
    from talr.general.sharded import replaying_doc_iterator

    require(SHARED_DATA / "ifeval")
    manager = make_task_manager(["ifeval"], tmp_path / "tasks", SHARED_DATA)
    task = lm_eval.tasks.get_task_dict(["ifeval"], manager)["ifeval"]

    def states(iterator) -> dict[int, list[int]]:
        """{doc_id: [hash of the random state at each letter draw while scoring it]} for the yielded documents."""
        out, current = {}, []
        build = LetterFrequencyChecker.build_description

        def recording(self, **kwargs):
            current.append(hash(random.getstate()))
            return build(self, **kwargs)

        LetterFrequencyChecker.build_description = recording
        try:
            random.seed(1234)
            for doc_id, doc in iterator:
                current.clear()
                task.process_results(doc, ["an answer"])
                out[doc_id] = list(current)
        finally:
            LetterFrequencyChecker.build_description = build
        return out

    one = states(Task.doc_iterator(task, rank=0, limit=23, world_size=1))
    assert len(one[19]) == 2 and len(one[22]) == 2  # strict and loose checks draw once each
    replaying = replaying_doc_iterator(Task.doc_iterator)
    for rank in (0, 1):
        mine = states(replaying(task, rank=rank, limit=23, world_size=2))
        assert sorted(mine) == list(range(rank, 23, 2))
        assert mine == {d: one[d] for d in mine}
    plain = states(Task.doc_iterator(task, rank=0, limit=23, world_size=2))  # lm-eval's split alone
    assert plain[22] != one[22]  # the defect this guards against
