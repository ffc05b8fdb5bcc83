"""Beyond one node: scripts/slurm/ on a simulated cluster.

* Two "nodes" on this machine (two `scripts/slurm/torchrun_multinode.sh` launchers, `--nnodes 2 --nproc_per_node 1`,
  static rendezvous on localhost) train a tiny model with FSDP2 (`ModelParallelStrategy`, gloo) to the same
  per-step losses and bit-identical weights as one node with 2 processes, through Lightning's own
  TorchElasticEnvironment. The 2-node run is interrupted by SIGTERM mid-run and resumed by rerunning the same
  command (the scripts pass `--ckpt_path last`), as a requeued job would be.
* `scripts/slurm/train.sbatch` is valid bash, and the command it builds for a paper config on 2 nodes parses
  through the CLI with the scaled values (num_nodes, devices, FSDP2 mesh, accumulation, SLURMEnvironment
  without Lightning's in-handler auto-requeue, CheckpointOnSigterm, ckpt_path last).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import fit_config
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"
PAPER_CONFIG = ROOT / "configs" / "paper" / "medcalc" / "cot" / "Qwen2.5-3B-Instruct" / "talr_lr5e-6.yaml"
sys.path.insert(0, str(SLURM))
from scale_args import scale_args  # noqa: E402

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path, model_dir: Path, extra_callbacks=()) -> Path:
    """2 ranks x 1 sequence per step (the config's own topology: 1 node x 2 devices), 8 sequences: 4 steps = 1 epoch."""
    root.mkdir(parents=True, exist_ok=True)
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 2, "save_last": True, "save_top_k": 0}},
        {"class_path": "talr.callbacks.ExportHF", "init_args": {"dirpath": str(root / "hf")}},
        *extra_callbacks,
    ]
    return fit_config(root, model_dir, "synthetic", trainer={
        "devices": 2, "max_steps": STEPS, "enable_checkpointing": True, "limit_val_batches": 0,
        "num_sanity_val_steps": 0, "callbacks": callbacks,
        "strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                     "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1, "timeout": "0:03:00"}},
    }, method_args={"baseline_eval": False, "warmup_ratio": 0.0, "generate_in_eval": False},
        data={"batch_size": 1, "max_length": 512})


def _launch(config: Path, nodes: int, nproc: int, log: Path, script: bool = True) -> None:
    """Start `nodes` copies of torchrun_multinode.sh (one per simulated node) and wait for all of them;
    `script=False`: plain torchrun with the config as it is (the reference)."""
    port = _free_port()
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1",
           "NNODES": str(nodes), "NPROC_PER_NODE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TALR_WORKDIR": str(ROOT)}
    procs = []
    for rank in range(nodes):
        out = open(f"{log}.node{rank}", "w")
        cmd = (["bash", str(SLURM / "torchrun_multinode.sh"), str(config)] if script else
               [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "talr", "fit", "--config", str(config)])
        procs.append((subprocess.Popen(cmd, env={**env, "NODE_RANK": str(rank)}, stdout=out, stderr=subprocess.STDOUT),
                      out))
    try:
        codes = [p.wait(timeout=420) for p, _ in procs]
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
            out.close()
    logs = "\n".join(Path(f"{log}.node{r}").read_text()[-3000:] for r in range(nodes))
    assert codes == [0] * nodes, logs


def _losses(root: Path) -> dict[int, float]:
    out = {}
    for f in sorted((root / "run" / "csv").glob("version_*/metrics.csv")):
        with f.open() as fh:
            out.update({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")})
    return out


@pytest.mark.slow
def test_two_nodes_equal_one_node_and_resume_after_sigterm(tmp_path, tiny_model_dir):
    one = tmp_path / "one_node"
    _launch(_config(one, tiny_model_dir), nodes=1, nproc=2, log=tmp_path / "one", script=False)
    two = tmp_path / "two_nodes"
    interrupted = _config(two, tiny_model_dir, [{"class_path": "helpers.SigtermAt", "init_args": {"step": 2}}])
    interrupted = interrupted.rename(two / "interrupted.yaml")
    _launch(interrupted, nodes=2, nproc=1, log=tmp_path / "two-a")
    assert not (two / "hf").exists()  # stopped by the signal, not finished
    last = two / "ckpt" / "last.ckpt"  # a sharded (distributed) checkpoint: a folder
    assert last.is_dir() and torch.load(last / "meta.pt", weights_only=True)["global_step"] == 3  # on the signal
    assert "Received SIGTERM" in (tmp_path / "two-a.node1").read_text()  # node 1's rank was signalled too
    _launch(_config(two, tiny_model_dir), nodes=2, nproc=1, log=tmp_path / "two-b")  # the requeued job
    assert "Restored all states from the checkpoint at" in (tmp_path / "two-b.node0").read_text()

    ref, got = _losses(one), _losses(two)
    assert sorted(ref) == sorted(got) == list(range(STEPS))
    assert got == ref  # rank 0's loss, step by step, bit for bit
    a, b = load_file(one / "hf" / "model.safetensors"), load_file(two / "hf" / "model.safetensors")
    init = load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained


def _cli_config(args: list[str]) -> dict:
    from talr.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_sbatch_builds_a_command_the_cli_parses(tmp_path):
    script = SLURM / "train.sbatch"
    for shell_script in (script, SLURM / "torchrun_multinode.sh"):
        subprocess.run(["bash", "-n", str(shell_script)], check=True)
    env = {**os.environ, "TALR_DRY_RUN": "1", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8(x2)",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(script), str(PAPER_CONFIG.relative_to(ROOT)), "--data.batch_size", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = proc.stdout.splitlines()
    assert cmd[:4] == [sys.executable, "-m", "talr", "fit"]
    assert "64 sequences per optimizer step (config: 64)" in proc.stderr
    cfg = _cli_config(cmd[4:])
    trainer = cfg["trainer"]
    assert (trainer["num_nodes"], int(trainer["devices"]), trainer["accumulate_grad_batches"]) == (2, 8, 2)
    assert trainer["strategy"]["init_args"]["data_parallel_size"] == 16
    assert trainer["strategy"]["init_args"]["tensor_parallel_size"] == 1
    assert cfg["data"]["batch_size"] == 2  # 2 x 16 ranks x 2 = the paper's 64 sequences per step
    assert trainer["plugins"]["class_path"].endswith("SLURMEnvironment")
    assert trainer["plugins"]["init_args"]["auto_requeue"] is False
    assert [c["class_path"] for c in trainer["callbacks"]].count("talr.callbacks.CheckpointOnSigterm") == 1
    assert cfg["ckpt_path"] == "last"


def test_scale_args_keeps_the_global_batch_or_refuses():
    cfg = yaml.safe_load(PAPER_CONFIG.read_text())  # 4 per GPU x 8 GPUs x 2 = 64
    args, notes = scale_args(cfg, nodes=2, gpus_per_node=8)
    assert args[args.index("--trainer.accumulate_grad_batches") + 1] == "1"
    assert args[-2:] == ["--ckpt_path", "last"] and "--trainer.callbacks+=talr.callbacks.CheckpointOnSigterm" in args
    assert not [n for n in notes if n.startswith("warning")]
    with pytest.raises(SystemExit, match="does not divide"):
        scale_args(cfg, nodes=4, gpus_per_node=8)  # 4 x 32 ranks > 64
    args, _ = scale_args(cfg, nodes=4, gpus_per_node=8, accumulate=1)  # explicit: 128 per step
    assert args[args.index("--trainer.accumulate_grad_batches") + 1] == "1"
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = None
    _, notes = scale_args(cfg, nodes=2, gpus_per_node=8)
    assert any("dirpath is null" in n for n in notes)
