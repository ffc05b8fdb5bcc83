"""One chat format (talr.chat) for training labels, domain generation, drift and the general eval, on tokenizers
carrying the real chat templates of Qwen2.5, Qwen3 and Gemma-3 (tests/fixtures/families.py)."""

from __future__ import annotations

import json

import lightning.pytorch as L
import pytest
import torch
from fixtures.families import family_generation_config, make_family_tokenizer

from talr.chat import ChatFormat, chat_format_of
from talr.data.encoding import IGNORE, encode_rows
from talr.generation import decode_answers, greedy_generate, left_pad
from talr.tasks import MedCalc

ROW_TASK = MedCalc(source="synthetic", format="label", max_examples={"train": 2})
THINK_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
# family (template kwargs) -> (end of the generation prompt, the supervised completion around the target)
CASES = {
    "qwen2.5": ({}, "<|im_start|>assistant\n", "{target}<|im_end|>"),
    "qwen3-no-think": ({"enable_thinking": False}, THINK_OFF, "{target}<|im_end|>"),
    # thinking on: the template closes an empty think block inside the assistant turn, so it is supervised
    "qwen3-think": ({}, "<|im_start|>assistant\n", "<think>\n\n</think>\n\n{target}<|im_end|>"),
    "gemma3": ({}, "<start_of_turn>model\n", "{target}<end_of_turn>"),
    "smollm2": ({}, "<|im_start|>assistant\n", "{target}<|im_end|>"),
}
END_OF_TURN = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "gemma3": "<end_of_turn>", "smollm2": "<|im_end|>"}


def family_of(case: str) -> str:
    return case.split("-")[0]


def fmt_for(family: str, tokenizer, **template_kwargs) -> ChatFormat:
    return ChatFormat.from_tokenizer(tokenizer, template_kwargs, family_generation_config(family, tokenizer))


def scripted_model(tokenizer, transitions: dict[str, str], generation_config=None):
    """A 1-layer Llama whose greedy next token depends only on the current one: `transitions[current] = next`
    (token strings; any other token -> id 0). Attention and MLP outputs are zero, so the residual stream is
    the token's embedding: a one-hot direction per scripted token, read out by the untied output layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = tokenizer.convert_tokens_to_ids
    sources = list(transitions)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4 * max(2, len(sources)), intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        for i, source in enumerate(sources):
            model.model.embed_tokens.weight[ids(source), i] = 1.0
            model.lm_head.weight[ids(transitions[source]), i] = 10.0
    if generation_config is not None:
        model.generation_config = generation_config
    return model


# -- labels ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_label_mask_ends_at_the_end_of_turn_token(case):
    """Prompt never supervised; the supervised tokens are exactly the assistant turn up to its end-of-turn token
    (Gemma's <end_of_turn>, not <eos>); the newline the template writes after it is not. Old code trimmed
    after the tokenizer's eos only: Gemma's labels kept the "\\n" after <end_of_turn>."""
    family = family_of(case)
    kwargs, prompt_end, completion = CASES[case]
    tok = make_family_tokenizer(family)
    fmt = fmt_for(family, tok, **kwargs)
    row = ROW_TASK.load_splits()["train"][0]
    (example,), _ = encode_rows(ROW_TASK, [row], tok, max_length=4096, progress=False, chat_format=fmt)
    ids, labels, prompt = example["input_ids"], example["labels"], example["prompt_ids"]

    rendered_prompt = tok.apply_chat_template(ROW_TASK.messages(row), tokenize=False, add_generation_prompt=True,
                                              **kwargs)
    assert rendered_prompt.endswith(prompt_end)
    assert tok.decode(prompt, skip_special_tokens=False) == rendered_prompt
    assert labels[: len(prompt)] == [IGNORE] * len(prompt) and IGNORE not in labels[len(prompt):]
    assert labels[len(prompt):] == ids[len(prompt):]
    expected = completion.format(target=ROW_TASK.target(row))
    assert tok.decode(ids[len(prompt):], skip_special_tokens=False) == expected
    assert ids[-1] == tok.convert_tokens_to_ids(END_OF_TURN[family])
    whole = tok.apply_chat_template(ROW_TASK.messages(row) + [{"role": "assistant", "content": ROW_TASK.target(row)}],
                                    tokenize=False, **kwargs)
    assert whole == rendered_prompt + expected + "\n"  # the template's trailing newline is not supervised


def test_old_eos_trimming_supervised_gemmas_newline():
    """Why the test above fails on the old code: Gemma's eos is <eos>, absent from the assistant turn."""
    tok = make_family_tokenizer("gemma3")
    assert tok.eos_token == "<eos>" and tok.eos_token_id != tok.convert_tokens_to_ids("<end_of_turn>")


# -- stop ids ---------------------------------------------------------------------------------------------
def test_stop_ids_are_the_union_of_tokenizer_family_and_generation_config():
    from transformers import GenerationConfig

    tok = make_family_tokenizer("gemma3")
    eos, eot = tok.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    assert set(ChatFormat.from_tokenizer(tok).end_of_turn_ids) == {eos, eot}  # known end-of-turn token added
    fmt = ChatFormat.from_tokenizer(tok, generation_config=GenerationConfig(eos_token_id=[eos, eot, 777]))
    assert fmt.end_of_turn_ids == (eos, eot, 777)
    model = scripted_model(tok, {"A": "B"}, GenerationConfig(eos_token_id=5))  # an int is a list of one
    assert fmt.for_model(model).end_of_turn_ids == (eos, eot, 777, 5)
    qwen = make_family_tokenizer("qwen3")
    qfmt = fmt_for("qwen3", qwen, enable_thinking=False)
    assert set(qfmt.end_of_turn_ids) == set(qwen.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert qfmt.think_end is None and fmt_for("qwen3", qwen).think_end == "</think>"
    assert fmt_for("qwen2.5", make_family_tokenizer("qwen2.5")).think_end is None


def gemma_scripted(tok):
    """Answers "A", then <end_of_turn>; a run that does not stop there goes on with "B" forever."""
    return scripted_model(tok, {"Ċ": "A", "A": "<end_of_turn>", "<end_of_turn>": "B", "B": "B"},
                          family_generation_config("gemma3", tok))


def test_generation_stops_at_gemmas_end_of_turn(tmp_path):
    """Domain generation (SFT.generate) and drift stop at <end_of_turn>; the old code passed
    eos_token_id=tokenizer.eos_token_id (<eos>) and generated "ABBBBBB" up to max_new_tokens."""
    from talr.general.drift import CodeLengthDriftCallback
    from talr.methods import SFT

    tok = make_family_tokenizer("gemma3")
    model = gemma_scripted(tok)
    fmt = ChatFormat.from_tokenizer(tok)  # no generation config given: the model's is added when generating
    prompts = [fmt.encode(tok, [{"role": "user", "content": q}]) for q in ("Hi", "What is two plus two?")]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    A = tok.convert_tokens_to_ids("A")
    assert greedy_generate(model, tok, ids, mask, 8, fmt) == [[A, eot], [A, eot]]

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    module = SFT(pretrained=str(tmp_path / "m"), max_new_tokens=8)
    module.configure_model()
    assert module.generate(ids, mask) == ["A", "A"]

    drift = CodeLengthDriftCallback(num_prompts=3, max_new_tokens=8, batch_size=2)
    drift.setup_reference(model, tok, fmt)
    assert drift.answer_ids == [[A, eot]] * 3


def test_generation_stops_at_a_generation_config_only_id():
    """A stop id only the model's generation config names still stops generation (not overridden)."""
    from transformers import GenerationConfig

    tok = make_family_tokenizer("qwen2.5")
    model = scripted_model(tok, {"Ċ": "A", "A": "B", "B": "C", "C": "C"},
                           GenerationConfig(eos_token_id=tok.convert_tokens_to_ids("B")))
    fmt = ChatFormat.from_tokenizer(tok)
    ids, mask = left_pad([fmt.encode(tok, [{"role": "user", "content": "Hi"}])], tok.pad_token_id)
    assert decode_answers(tok, greedy_generate(model, tok, ids, mask, 6, fmt), fmt) == ["AB"]


def test_thinking_is_stripped_from_answers_when_on():
    tok = make_family_tokenizer("qwen3")
    think = fmt_for("qwen3", tok)
    model = scripted_model(tok, {"Ċ": "<think>", "<think>": "x", "x": "</think>", "</think>": "A", "A": "<|im_end|>"},
                           family_generation_config("qwen3", tok))
    ids, mask = left_pad([think.encode(tok, [{"role": "user", "content": "Hi"}])], tok.pad_token_id)
    answers = greedy_generate(model, tok, ids, mask, 10, think)
    assert tok.decode(answers[0], skip_special_tokens=True) == "<think>x</think>A"
    assert decode_answers(tok, answers, think) == ["A"]
    think_end = tok.convert_tokens_to_ids("</think>")
    assert think.lm_eval_args(tok) == {"chat_template_args": {}, "think_end_token": think_end}


# -- the whole run: one setting, every consumer ------------------------------------------------------
def tiny_gsm8k(tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}
            for i in range(6)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"gsm8k": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}}


def test_general_eval_answers_stop_at_the_end_of_turn_token(tmp_path):
    """lm-eval's HFLM stops on the task's strings and the decoded tokenizer eos; a Gemma model whose generation
    config names only <eos> kept generating after <end_of_turn> ("ABBBBBBB" on the old code)."""
    from transformers import GenerationConfig

    from talr.general.evaluate import evaluate_general

    tok = make_family_tokenizer("gemma3")
    model = gemma_scripted(tok)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = evaluate_general(model, tok, tasks=["gsm8k"], limit=1, max_gen_toks=8, data_files=tiny_gsm8k(tmp_path),
                           log_samples=True, bootstrap_iters=0)
    samples = out["samples"]["gsm8k"]  # one per filter (strict-match, flexible-extract), the same document
    assert samples and all(s["doc_id"] == 0 and s["resps"] == [["A"]] for s in samples)
    assert out["config"]["chat_format"]["end_of_turn_tokens"] == ["<eos>", "<end_of_turn>"]


class RecordingSFT:
    """SFT that records the prompts domain generation receives and the chat format it resolves."""

    def __new__(cls, **kwargs):
        from talr.methods import SFT

        class _Recording(SFT):
            def generate(self, input_ids, attention_mask):
                self.seen = getattr(self, "seen", []) + [(input_ids.clone(), chat_format_of(self))]
                return super().generate(input_ids, attention_mask)

        return _Recording(**kwargs)


@pytest.mark.slow
def test_qwen3_without_thinking_renders_the_same_prompts_everywhere(tmp_path):
    """`data.chat_template_kwargs: {enable_thinking: false}` reaches training labels, domain generation, drift and
    the general eval: every prompt ends with the empty think block. The old code rendered drift and general-eval
    prompts in thinking mode (`<|im_start|>assistant\\n`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from talr.data.datamodule import DomainDataModule
    from talr.general import CodeLengthDriftCallback, GeneralEvalCallback
    from talr.general.evaluate import evaluate_general

    tok = make_family_tokenizer("qwen3")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id))
    model.generation_config = family_generation_config("qwen3", tok)
    model.save_pretrained(tmp_path / "qwen3")
    tok.save_pretrained(tmp_path / "qwen3")
    files = tiny_gsm8k(tmp_path)

    class Recording(GeneralEvalCallback):
        def run_eval(self, model, tokenizer):
            self.seen = evaluate_general(model, tokenizer, tasks=self.tasks, limit=self.limit, data_files=files,
                                         max_gen_toks=self.max_gen_toks, chat_format=self.chat_format,
                                         log_samples=True, bootstrap_iters=0)
            return self.seen

    general = Recording(tasks=["gsm8k"], limit=1, every_n_epochs=None, at_end=False, max_gen_toks=2)
    drift = CodeLengthDriftCallback(num_prompts=2, max_new_tokens=2, every_n_steps=100)
    data = DomainDataModule(MedCalc(source="synthetic", format="label",
                                    max_examples={"train": 2, "validation": 2, "test": 2}),
                            tokenizer=str(tmp_path / "qwen3"), max_length=1024, batch_size=2, eval_batch_size=2,
                            chat_template_kwargs={"enable_thinking": False})
    module = RecordingSFT(pretrained=str(tmp_path / "qwen3"), max_new_tokens=2, lr=1e-4)
    L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, callbacks=[general, drift],
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0).fit(module, datamodule=data)

    def text(ids):
        return tok.decode([i for i in ids if i != tok.pad_token_id], skip_special_tokens=False)

    train = data.examples["train"][0]
    assert text(train["prompt_ids"]).endswith(THINK_OFF)  # training: the prompt ends where labels start
    assert tok.decode(train["input_ids"][len(train["prompt_ids"]):]).startswith('{"answer"')
    generation_prompts, resolved = module.seen[0]  # domain generation (baseline validation)
    assert all(text(row).endswith(THINK_OFF) for row in generation_prompts)
    assert dict(resolved.template_kwargs) == {"enable_thinking": False}
    assert all(text(p).endswith(THINK_OFF) for p in drift.prompt_ids)  # drift
    contexts = [s["arguments"][0][0] for s in general.seen["samples"]["gsm8k"]]  # the general eval
    assert contexts and all(c.endswith(THINK_OFF) for c in contexts)
    assert general.seen["config"]["chat_format"]["template_kwargs"] == {"enable_thinking": False}


def test_evaluate_cli_takes_chat_template_kwargs(tiny_model_dir, monkeypatch, capsys):
    import talr.general.evaluate as evaluate
    from talr.general.cli import main

    seen = {}

    def fake(model, tokenizer, **kwargs):
        seen.update(kwargs)
        return {"results": {}, "general/score": None, "config": {}, "versions": {"lm_eval": "x", "tasks": {}},
                "wall_time_s": 0.0}

    monkeypatch.setattr(evaluate, "evaluate_general", fake)
    assert main(["--model", str(tiny_model_dir), "--tasks", "gsm8k", "--chat-template-kwargs",
                 '{"enable_thinking": false}']) == 0
    assert dict(seen["chat_format"].template_kwargs) == {"enable_thinking": False}
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_model_dir), "--chat-template-kwargs", "[1]"])


# -- FSDP2: ranks whose answers end at different steps --------------------------------------------------
def _sharded_generate(rank: int, port: int, out_dir: str, synced: bool) -> None:
    import datetime
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import talr.generation as generation

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    tok = make_family_tokenizer("gemma3")
    model = gemma_scripted(tok)
    model.model.embed_tokens.weight.data[tok.convert_tokens_to_ids("C"), -1] = 1.0  # "C" -> "B" forever
    model.lm_head.weight.data[tok.convert_tokens_to_ids("B"), -1] = 10.0
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not synced:  # no lockstep: rank 0 leaves generate while rank 1 still steps (checks that the test bites)
        import functools

        model.generate = functools.partial(model.generate, synced_gpus=False)
    fmt = ChatFormat.from_tokenizer(tok)
    last = tok.convert_tokens_to_ids(["Ċ" if rank == 0 else "C"])  # rank 0 answers "A" and stops; rank 1 never stops
    prompt = fmt.encode(tok, [{"role": "user", "content": "Hi"}])[:-1] + last
    ids, mask = left_pad([prompt], tok.pad_token_id)
    answer = generation.greedy_generate(model, tok, ids, mask, 6, fmt)
    dist.barrier()
    torch.save(answer, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def run_two_ranks(fn, *args, timeout: float = 240.0) -> None:
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(fn, args=(port, *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"2-rank run did not finish in {timeout} s")


@pytest.mark.slow
def test_sharded_generation_steps_in_lockstep_when_answers_end_at_different_steps(tmp_path):
    """Under FSDP2 each decoding step is a collective: rank 0's answer ends after 2 tokens (it now stops at the
    end-of-turn token), rank 1's never does. transformers steps every rank until all are done (synced_gpus,
    detected from fully_shard); a guard, not a defect of the old code: with synced_gpus=False (the `False` run
    of _sharded_generate) gloo times out waiting for rank 0."""
    run_two_ranks(_sharded_generate, str(tmp_path), True)
    tok = make_family_tokenizer("gemma3")
    A, B, eot = tok.convert_tokens_to_ids(["A", "B", "<end_of_turn>"])
    assert torch.load(tmp_path / "rank0.pt") == [[A, eot]]
    assert torch.load(tmp_path / "rank1.pt") == [[B] * 6]
