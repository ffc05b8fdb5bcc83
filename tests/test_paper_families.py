"""Every paper model family runs its committed paper config end to end: 2 processes on CPU, FSDP2.

Each case saves a tiny random model of the family's transformers class (tests/fixtures/family_models.py) with
the family's tokenizer (real chat template and special tokens, tests/fixtures/families.py) and launches the
COMMITTED config `configs/paper/medcalc/<format>/<model>/<method>_lr1e-6.yaml` as a user does, under
torchrun with overrides for size only (tests/fixtures/paper_runs.py says exactly which). A run passes when it
exits 0 in time and leaves summary.json (baseline -> final domain numbers, general eval before and after,
drift), an exported HF directory that transformers loads as the family's text model with trained weights,
and a distributed checkpoint.

Coverage of the default suite: every method on
Qwen3 (label: sft, talr, flow, l2, lora; the sft run is also WiSE-FT's step 1, whose committed config is the
same run, and `talr average` is run on it), Gemma-3 on sft and lora (the multimodal checkpoint trained as its
language model, with and without peft), Qwen2.5 on lora (label) and talr (CoT: long targets; the 7B's untied
output layer), SmolLM2 on sft (the CoT base config + method overlay; not a paper model). The sft and lora pair
covers what differs per architecture (FSDP2 units, export layout, peft targets); the method-specific code is
architecture-independent and runs on Qwen3. Each run costs ~30 s of CPU (process tree; mostly start-up: torchrun,
two workers importing torch/lightning/transformers/lm-eval): ~300 CPU-seconds for the 10 default runs (10 min
wall measured on a shared, loaded 2-core machine; it is less on idle cores).
TALR_ALL_PAPER_FAMILIES=1 runs the whole family x format x method matrix (42 runs). The Qwen3 sft run keeps the
committed WandbLogger (offline); the others log to CSV in the same directory.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import MEDCALC_CSV, SHARED_DATA, require
from fixtures.families import make_family_tokenizer as family_tokenizer
from fixtures.family_models import TRAINED_CLASS, save_family_model
from fixtures.paper_runs import BATCH, CONFIG_FOLDER, ROWS, WORLD, PaperRun, expected_optimizer_steps, launch, \
    run_paper_config, tail

METHODS = ("sft", "talr", "flow", "l2", "lora", "wiseft")
DEFAULT = [("qwen3", "label", m) for m in ("sft", "talr", "flow", "l2", "lora")] + [
    ("gemma3", "label", "sft"), ("gemma3", "label", "lora"), ("qwen2.5", "label", "lora"), ("qwen2.5", "cot", "talr"),
    ("smollm2", "cot", "sft")]
WISEFT_WITH_SFT = ("qwen3", "label", "sft")  # its committed wiseft config is this same run (checked)


def known_defect(family: str, fmt: str, method: str) -> str | None:
    """Why a case fails on today's code (xfail, strict: it flips to a failure when fixed), or None."""
    return None


def cases() -> list:
    chosen = list(DEFAULT)
    if os.environ.get("TALR_ALL_PAPER_FAMILIES") == "1":
        chosen += [(f, fmt, m) for f in CONFIG_FOLDER for fmt in ("label", "cot") for m in METHODS
                   if (f, fmt, m) not in chosen and (f != "smollm2" or fmt == "cot")]
    params = []
    for case in chosen:
        reason = known_defect(*case)
        marks = [pytest.mark.slow] + ([pytest.mark.xfail(strict=True, reason=reason)] if reason else [])
        params.append(pytest.param(*case, id="-".join(case), marks=marks))
    return params


_RUNS: dict[tuple, PaperRun | BaseException] = {}


def paper_run(tmp_path_factory, case: tuple) -> PaperRun:
    """One launch per case per session, shared by the tests that read its outputs."""
    require(MEDCALC_CSV)
    require(SHARED_DATA / "ifeval")
    if case not in _RUNS:
        try:
            tmp = tmp_path_factory.mktemp("-".join(case))
            _RUNS[case] = run_paper_config(tmp, *case, wandb=case == WISEFT_WITH_SFT)
        except BaseException as err:  # noqa: BLE001 - re-raised for every test of this case
            _RUNS[case] = err
    if isinstance(_RUNS[case], BaseException):
        raise _RUNS[case]
    return _RUNS[case]


def check_outputs(run: PaperRun) -> None:
    from transformers import AutoModelForCausalLM

    from talr.modeling import load_model

    summary, cfg = run.summary, run.config
    assert summary["method"] == cfg["model"]["class_path"].rsplit(".", 1)[-1]
    for key in ("val/nll", "val/acc", "val/n"):
        assert key in summary["baseline"] and key in summary["final"], (key, summary["baseline"], summary["final"])
    tasks = [cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("GeneralEvalCallback")][0]
    for when in (summary["general_baseline"], summary["final"]):
        evaluated = {k.split("/")[1] for k in when if k.count("/") == 2 and k.startswith("general/")
                     and not k.startswith("general/eval_seconds/")}  # per-task seconds are timings, not tasks
        assert {f"general/eval_seconds/{task}" for task in evaluated} <= set(when), sorted(when)
        assert "general/score" in when and len(evaluated) == len(tasks["init_args"]["tasks"]), sorted(when)
    assert {"drift/nll", "drift/nll_delta"} <= set(summary["final"])
    kept = summary["data"]["train/kept"]
    assert kept % (WORLD * BATCH) != 0, "the fixture must split unevenly into per-rank batches"
    assert summary["optimizer_steps"] == expected_optimizer_steps(kept, cfg["trainer"]["accumulate_grad_batches"])

    hf = run.run_dir / "hf"
    exported = AutoModelForCausalLM.from_pretrained(hf)
    assert type(exported).__name__ == TRAINED_CLASS[run.family]
    tuned, start = exported.state_dict(), load_model(str(run.model_dir)).state_dict()  # gemma3: its text model
    assert tuned.keys() == start.keys()
    assert any(not torch.equal(v, start[k]) for k, v in tuned.items()), "the exported weights are the initial ones"
    if run.method == "lora":
        assert (hf / "adapter" / "adapter_config.json").exists() and not any("lora" in k for k in tuned)
    last = run.run_dir / "checkpoints" / "last.ckpt"
    assert last.exists(), sorted(p.name for p in last.parent.glob("*"))
    assert len(list(last.glob("*.distcp"))) == WORLD  # save_distributed_checkpoint: one shard file per rank


@pytest.mark.parametrize("family,fmt,method", cases())
def test_paper_config_runs_on_two_processes(tmp_path_factory, family, fmt, method):
    run = paper_run(tmp_path_factory, (family, fmt, method))
    check_outputs(run)
    if method == "wiseft" or (family, fmt, method) == WISEFT_WITH_SFT:
        check_wiseft(run)


def check_wiseft(run: PaperRun) -> None:
    """Step 2 of the committed WiSE-FT recipe on this SFT run: `talr average --init <model> --finetuned <hf>`."""
    from transformers import AutoModelForCausalLM

    from fixtures.paper_runs import committed_configs

    from talr.modeling import load_model

    sft, wiseft = (committed_configs(run.family, run.fmt, m)[-1] for m in ("sft", "wiseft"))
    body = lambda path: [line for line in path.read_text().splitlines() if not line.startswith("#")]  # noqa: E731
    assert body(sft) == body(wiseft), "WiSE-FT's step 1 is the SFT run"
    out = run.work / "wiseft"
    args = ["-m", "talr", "average", "--init", str(run.model_dir), "--finetuned", str(run.run_dir / "hf"),
            "--alphas", "0.5", "--output-dir", str(out)]
    log = run.work / "average.log"
    rc, _ = launch(args, run.work, log, 300)
    assert rc == 0, tail(log)
    averaged = AutoModelForCausalLM.from_pretrained(out / "alpha_0.50").state_dict()
    ft = AutoModelForCausalLM.from_pretrained(run.run_dir / "hf").state_dict()
    init = load_model(str(run.model_dir)).state_dict()  # gemma3: the language model of the multimodal checkpoint
    for key, value in averaged.items():
        torch.testing.assert_close(value, (init[key] + ft[key]) / 2, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_every_validation_scores_each_row_once(tmp_path_factory):
    """Issue 12 defect 8 (before 28e7994: val/n 10 at the baseline, every rank ran the whole set; 6 later, Lightning's
    padded distributed sampler scored one row twice)."""
    summary = paper_run(tmp_path_factory, WISEFT_WITH_SFT).summary
    rows = summary["data"]["validation/kept"]
    assert (summary["baseline"]["val/n"], summary["final"]["val/n"]) == (rows, rows)


@pytest.mark.slow
def test_tokens_seen_counts_every_rank(tmp_path_factory):
    """Issue 12 defect 8 (before 28e7994: tokens_seen 3850, rank 0's batches only, < 6972 = every row once)."""
    from talr.data.datamodule import DomainDataModule
    from talr.tasks.medcalc import MedCalc

    run = paper_run(tmp_path_factory, WISEFT_WITH_SFT)
    data = run.config["data"]
    task = MedCalc(**{**data["task"]["init_args"], "source": str(MEDCALC_CSV), "max_examples": ROWS})
    dm = DomainDataModule(task, tokenizer=str(run.model_dir), max_length=512, overlong=data["overlong"],
                          chat_template_kwargs=data.get("chat_template_kwargs"))
    dm.setup("fit")
    every_row_once = sum(len(e["input_ids"]) for e in dm.examples["train"])
    assert run.summary["tokens_seen"] >= every_row_once


def test_gemma3_loads_its_language_model_only(tmp_path):
    """google/gemma-3-4b-it is multimodal (Gemma3ForConditionalGeneration; AutoModelForCausalLM gives that class
    with its SigLIP tower). talr trains the language model alone (the paper fine-tunes text): `load_model` gives
    Gemma3ForCausalLM holding exactly the checkpoint's language-model tensors, computing the multimodal model's
    text logits and generations, exporting a checkpoint that loads back as itself; a checkpoint whose language
    model is not found is refused instead of silently initialised at random."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from talr.modeling import load_model

    tok = family_tokenizer("gemma3")
    path = save_family_model("gemma3", tok, tmp_path / "gemma3")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    full = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(full).__name__ == "Gemma3ForConditionalGeneration" and hasattr(full.model, "vision_tower")

    model = load_model(str(path)).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert not any("vision" in n or "multi_modal" in n for n, _ in model.named_parameters())
    stored = load_file(path / "model.safetensors")
    language = {k.removeprefix("language_model."): v for k, v in stored.items() if k.startswith("language_model.")}
    state = model.state_dict()
    assert set(language) == set(state) - {"lm_head.weight"}  # lm_head is tied to the embeddings, as on the hub
    assert all(torch.equal(state[k], v) for k, v in language.items())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, full(input_ids=ids).logits, rtol=0, atol=0)
        greedy = dict(max_new_tokens=6, do_sample=False, top_p=None, top_k=None)
        assert torch.equal(model.generate(ids, **greedy), full.generate(ids, **greedy))
    assert model.generation_config.eos_token_id == full.generation_config.eos_token_id  # <eos>, <end_of_turn>

    model.save_pretrained(tmp_path / "export")
    for reloaded in (load_model(str(tmp_path / "export")), AutoModelForCausalLM.from_pretrained(tmp_path / "export")):
        assert type(reloaded).__name__ == "Gemma3ForCausalLM"
        assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())

    broken = tmp_path / "broken"  # the language model's tensors under names the mapping does not know
    broken.mkdir()
    for name in ("config.json", "generation_config.json"):
        (broken / name).write_bytes((path / name).read_bytes())
    save_file({k.replace("language_model.", "text_model.", 1): v.contiguous() for k, v in stored.items()},
              broken / "model.safetensors")
    with pytest.raises(ValueError, match="language model's weights were not all found"):
        load_model(str(broken))


def test_gemma3_wiseft_averages_the_language_model(tmp_path):
    """WiSE-FT for gemma-3-4b-it (`talr average --init google/gemma-3-4b-it --finetuned <run>/hf`): the initial
    model is the multimodal checkpoint, the fine-tuned one talr's text-only export."""
    from transformers import AutoModelForCausalLM

    from talr.averaging import average_models
    from talr.modeling import load_model

    init = save_family_model("gemma3", family_tokenizer("gemma3"), tmp_path / "init")
    tuned = load_model(str(init))
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1.0)
    tuned.save_pretrained(tmp_path / "tuned")
    (out,) = average_models(str(init), str(tmp_path / "tuned"), [0.5], str(tmp_path / "avg"))
    averaged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    start = load_model(str(init)).state_dict()
    assert averaged.keys() == start.keys()
    for key, value in averaged.items():
        torch.testing.assert_close(value, start[key] + 0.5, rtol=0, atol=1e-6)
