"""lm-eval's HFLM under the run's chat format (talr.chat.ChatFormat).

lm-eval 0.4.13's HFLM already takes what is needed, it only has to be given it:
  * `chat_template_args` go to every `apply_chat_template` call (Qwen3's `enable_thinking: false`, so the
    general eval sees the prompts training saw: `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`);
  * `think_end_token`: with thinking on, the answer scored is what follows the last `</think>`.
What it lacks is the stop tokens: its `generate` stops on the task's `until` strings and the decoded
`tokenizer.eos_token`, and on the model's generation config only by accident. `_model_generate` here passes
the chat format's end-of-turn ids (the generation config's eos ids, the tokenizer's eos and the family's
end-of-turn token) as `eos_token_id`, so Gemma-3-it stops at `<end_of_turn>`.

Per-task seconds (`talr.general.evaluate.timed_tasks` sets `task_seconds`): `generate_until` runs HFLM's once per
group of requests with identical generation settings, lm-eval's own grouping (`Collator.group`), and adds each
group's seconds to its task (split by requests should several tasks share settings). HFLM batches each group on its
own, sorted by length, so the batches and answers are those of one call with all requests.
"""

from __future__ import annotations

import time
from collections import Counter

from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator

from talr.chat import ChatFormat


class ChatFormatHFLM(HFLM):
    def __init__(self, pretrained, tokenizer, chat_format: ChatFormat, **kwargs):
        chat_format = chat_format.for_model(pretrained)
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **chat_format.lm_eval_args(tokenizer), **kwargs)
        self.chat_format = chat_format
        self.task_seconds: dict[str, float] | None = None  # {task: seconds generating}, accumulated when set

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.task_seconds is None:
            return super().generate_until(requests, disable_tqdm)
        answers: list = [None] * len(requests)
        groups = Collator.group(list(enumerate(requests)), fn=lambda x: x[1].args[1], group_by="gen_kwargs")
        for members in groups.values():  # in order of first appearance, as HFLM's own Collator goes
            start = time.perf_counter()
            for (i, _), answer in zip(members, super().generate_until([r for _, r in members], disable_tqdm),
                                      strict=True):
                answers[i] = answer
            elapsed = time.perf_counter() - start
            for task, n in Counter(request.task_name for _, request in members).items():
                self.task_seconds[task] = self.task_seconds.get(task, 0.0) + elapsed * n / len(members)
        return answers

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.chat_format.end_of_turn_ids:
            generation_kwargs.setdefault("eos_token_id", list(self.chat_format.end_of_turn_ids))
        return super()._model_generate(context, max_length, stop, **generation_kwargs)
