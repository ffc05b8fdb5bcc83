"""General evaluation (lm-eval, in-memory model) on 1 process against 2 data-parallel processes, same threads each.

    python bench/bench_general_eval.py [--model builtin:SmolLM2-135M-Instruct] [--limit 8] [--repeats 2]

Each arm runs in fresh processes: `single` calls `evaluate_general` in one process; `data_parallel` starts 2 gloo
processes that each load the model and call `evaluate_general(..., data_parallel=True)` (talr.general.sharded).
Wall time is measured inside `evaluate_general` from after a barrier to the end (model loading excluded), so the
ratio is what the evaluation itself costs. Per task: the seconds `evaluate_general` reports for it
(`task_wall_time_s`: loading, prompts, generation, scoring; rank 0's share with 2 processes). The results of both
arms are compared document by document.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:SmolLM2-135M-Instruct")
    p.add_argument("--tasks", default="gsm8k,ifeval")
    p.add_argument("--limit", type=int, default=8, help="documents per task")
    p.add_argument("--max-gen-toks", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--worker", choices=["single", "rank"], help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from talr.general.evaluate import evaluate_general
    from talr.modeling import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    parallel = args.worker == "rank"
    if parallel:
        dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=args.rank, world_size=2,
                                timeout=datetime.timedelta(minutes=30))
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, "float32")
    if parallel:
        dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    result = evaluate_general(model, tokenizer, tasks=args.tasks.split(","), limit=args.limit, data_dir=args.data_dir,
                              batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, log_samples=True,
                              bootstrap_iters=0, data_parallel=parallel)
    if parallel:
        dist.barrier()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    generations = {t: [[s["doc_id"], s["filter"], s["resps"]] for s in rows] for t, rows in result["samples"].items()}
    print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": cpu, "score": result["general/score"],
                                  "task_s": result["task_wall_time_s"], "results": result["results"],
                                  "generations": generations}), flush=True)
    if parallel:
        dist.destroy_process_group()


def run_arm(args, arm: str, tmp: Path) -> dict:
    base = [sys.executable, __file__, "--model", args.model, "--tasks", args.tasks, "--limit", str(args.limit),
            "--max-gen-toks", str(args.max_gen_toks), "--batch-size", str(args.batch_size), "--threads",
            str(args.threads), "--data-dir", args.data_dir]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if arm == "single":
        cmds = [base + ["--worker", "single"]]
    else:
        init = tmp / f"init-{time.time_ns()}"
        cmds = [base + ["--worker", "rank", "--rank", str(r), "--init", str(init)] for r in range(2)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    outs = [p.communicate(timeout=3600) for p in procs]
    results = []
    for p, (out, err) in zip(procs, outs):
        line = [x for x in out.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            raise SystemExit(f"{arm} failed:\n{err[-4000:]}")
        results.append(json.loads(line[-1][7:]))
    return {"wall_s": max(r["wall_s"] for r in results), "cpu_s": [r["cpu_s"] for r in results],
            "score": results[0]["score"], "task_s": results[0]["task_s"], "results": results[0]["results"],
            "generations": results[0]["generations"],
            "ranks_agree": all(r["results"] == results[0]["results"] for r in results)}


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        return worker(args)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench_general_"))
    runs: dict[str, list[dict]] = {"single": [], "data_parallel": []}
    for r in range(args.repeats):
        for arm in runs:
            res = run_arm(args, arm, tmp)
            runs[arm].append(res)
            print(f"[{r + 1}/{args.repeats}] {arm}: {res['wall_s']:.1f} s wall, CPU s per process "
                  f"{[round(c, 1) for c in res['cpu_s']]}", file=sys.stderr, flush=True)
    single, dp = runs["single"][0], runs["data_parallel"][0]
    same = single["results"] == dp["results"] and single["generations"] == dp["generations"] and dp["ranks_agree"]
    w1 = statistics.median(r["wall_s"] for r in runs["single"])
    w2 = statistics.median(r["wall_s"] for r in runs["data_parallel"])
    print(f"{args.model}; tasks {args.tasks}, {args.limit} documents each, max_gen_toks {args.max_gen_toks}, batch "
          f"{args.batch_size}, {args.threads} thread(s) per process; median of {args.repeats}\n")
    tasks = list(single["task_s"])
    print(f"| processes | wall s | {' | '.join(f'{t} s' for t in tasks)} | CPU s per process | general/score |")
    print("|---" * (len(tasks) + 4) + "|")
    for name, runs_ in (("1", runs["single"]), ("2 (data parallel)", runs["data_parallel"])):
        cpu = ", ".join(f"{statistics.median(r['cpu_s'][i] for r in runs_):.1f}" for i in range(len(runs_[0]["cpu_s"])))
        per_task = " | ".join(f"{statistics.median(r['task_s'][t] for r in runs_):.1f}" for t in tasks)
        print(f"| {name} | {statistics.median(r['wall_s'] for r in runs_):.1f} | {per_task} | {cpu} | "
              f"{runs_[0]['score']} |")
    print(f"\n2 processes / 1 process wall time: {w2 / w1:.2f}; identical results and generations: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "ratio": w2 / w1, "identical": same},
                                              indent=1))


if __name__ == "__main__":
    main()
