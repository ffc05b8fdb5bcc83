"""The one chat format of a run: how prompts are rendered, where an assistant turn ends, when generation stops.

Configured once, by `data.chat_template_kwargs` (e.g. `{enable_thinking: false}` for Qwen3); everything else is
read from the tokenizer and the model's generation config. The DataModule builds it (`datamodule.chat_format`)
and every consumer uses that object: training labels (`talr.data.encoding`), domain generation
(`SFT.generate` -> `talr.generation.greedy_generate`), the drift callback, the general-eval callback and
`talr evaluate` (`--chat-template-kwargs`).

    template_kwargs   passed to every `apply_chat_template` call (training, generation, drift, lm-eval)
    end_of_turn_ids   the union of the tokenizer's eos, the end-of-turn token the chat template writes
                      (`<|im_end|>`, `<end_of_turn>` or `<|eot_id|>`, when a single token) and the model's
                      `generation_config.eos_token_id` (int or list). Generation stops at any of them; in a
                      training example the last one inside the assistant turn is the last supervised token
                      (what a template appends after it, e.g. Gemma's and Qwen's "\\n", is dropped).
    think_end         "</think>" when the template has a thinking mode and it is on (Qwen3 without
                      `enable_thinking: false`): answers are scored on the text after the last "</think>".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any


# Tokens that end an assistant turn in the chat templates of the families we know: ChatML (Qwen, SmolLM2),
# Gemma, Llama 3. A tokenizer's eos is often not the turn end (Gemma's is <eos>), so these are added to it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")
THINK_END = "</think>"


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def _single_token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the vocabulary has it as one token (unknown tokens map to unk: checked back)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return int(token_id)


@dataclass(frozen=True)
class ChatFormat:
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    end_of_turn_ids: tuple[int, ...] = ()
    think_end: str | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer, template_kwargs: Mapping[str, Any] | None = None,
                       generation_config=None) -> ChatFormat:
        template = getattr(tokenizer, "chat_template", None) or ""
        template = template if isinstance(template, str) else ""
        ids = _as_ids(tokenizer.eos_token_id)
        # the family's end-of-turn token: one the template writes and the vocabulary has as a single token
        turn_ends = (_single_token_id(tokenizer, t) for t in END_OF_TURN_TOKENS if t in template)
        ids += [i for i in turn_ends if i is not None]
        ids += _as_ids(getattr(generation_config, "eos_token_id", None))
        kwargs = dict(template_kwargs or {})
        thinking = THINK_END in template and kwargs.get("enable_thinking", True) is not False
        return cls(template_kwargs=kwargs, end_of_turn_ids=tuple(dict.fromkeys(ids)),
                   think_end=THINK_END if thinking else None)

    def with_generation_config(self, generation_config) -> ChatFormat:
        """This format with the generation config's eos ids added to the stop/end-of-turn ids."""
        extra = [i for i in _as_ids(getattr(generation_config, "eos_token_id", None)) if i not in self.end_of_turn_ids]
        return replace(self, end_of_turn_ids=self.end_of_turn_ids + tuple(extra)) if extra else self

    def for_model(self, model) -> ChatFormat:
        return self.with_generation_config(getattr(model, "generation_config", None))

    # -- prompts ---------------------------------------------------------------------------------
    def render(self, tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **self.template_kwargs)

    def encode(self, tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation (the template writes any BOS itself; none is added)."""
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt,
                                            **self.template_kwargs)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)

    # -- completions -----------------------------------------------------------------------------
    def completion_end(self, completion: Sequence[int]) -> int:
        """Length of `completion` (the assistant turn's tokens) up to and including its last end-of-turn token;
        the whole completion when it has none."""
        stops = set(self.end_of_turn_ids)
        for i in range(len(completion) - 1, -1, -1):
            if completion[i] in stops:
                return i + 1
        return len(completion)

    def cut_at_stop(self, tokens: Iterable[int]) -> list[int]:
        """Generated tokens up to and including the first end-of-turn token."""
        stops, out = set(self.end_of_turn_ids), []
        for t in tokens:
            out.append(t)
            if t in stops:
                break
        return out

    def strip_thinking(self, text: str) -> str:
        """The answer part of a generation: the text after the last "</think>" when thinking is on (lm-eval's rule)."""
        if self.think_end is None or self.think_end not in text:
            return text
        return text.split(self.think_end)[-1].lstrip()

    def lm_eval_args(self, tokenizer) -> dict[str, Any]:
        """Keyword arguments for lm-eval's HFLM: the template kwargs, and the end-of-thinking marker (by id
        when it is one token, so it is found even where decoding drops it)."""
        args: dict[str, Any] = {"chat_template_args": dict(self.template_kwargs)}
        if self.think_end is not None:
            token_id = _single_token_id(tokenizer, self.think_end)
            args["think_end_token"] = token_id if token_id is not None else self.think_end
        return args

    def describe(self, tokenizer=None) -> dict[str, Any]:
        names = tokenizer.convert_ids_to_tokens(list(self.end_of_turn_ids)) if tokenizer is not None else None
        return {"template_kwargs": dict(self.template_kwargs), "end_of_turn_ids": list(self.end_of_turn_ids),
                "end_of_turn_tokens": names, "think_end": self.think_end}


def load_generation_config(name_or_path: str | None):
    """The generation config next to a model (hub id or directory), or None where there is none."""
    if not name_or_path:
        return None
    from transformers import GenerationConfig

    from talr.modeling import resolve

    try:
        path, extra = resolve(name_or_path, tokenizer_only=True)
        if "gguf_file" in extra:
            return None
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


def chat_format_of(pl_module, trainer=None) -> ChatFormat:
    """The run's chat format: the DataModule's (configured by `data.chat_template_kwargs`), with the model's
    generation-config stop ids; without a DataModule, the tokenizer's defaults (no template kwargs)."""
    if trainer is None:
        try:
            trainer = pl_module.trainer  # Lightning raises when the module is not attached to a Trainer
        except (AttributeError, RuntimeError):
            trainer = None
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    fmt = getattr(datamodule, "chat_format", None)
    if fmt is None:
        fmt = ChatFormat.from_tokenizer(pl_module.tokenizer)
    return fmt.for_model(getattr(pl_module, "model", None))
