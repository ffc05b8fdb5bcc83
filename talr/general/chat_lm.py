"""lm-eval's HFLM under the run's chat format (talr.chat.ChatFormat).

lm-eval 0.4.13's HFLM already takes what is needed, it only has to be given it:
  * `chat_template_args` go to every `apply_chat_template` call (Qwen3's `enable_thinking: false`, so the
    general eval sees the prompts training saw: `<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`);
  * `think_end_token`: with thinking on, the answer scored is what follows the last `</think>`.
What it lacks is the stop tokens: its `generate` stops on the task's `until` strings and the decoded
`tokenizer.eos_token`, and on the model's generation config only by accident. `_model_generate` here passes
the chat format's end-of-turn ids (the generation config's eos ids, the tokenizer's eos and the family's
end-of-turn token) as `eos_token_id`, so Gemma-3-it stops at `<end_of_turn>`.
"""

from __future__ import annotations

from lm_eval.models.huggingface import HFLM

from talr.chat import ChatFormat


class ChatFormatHFLM(HFLM):
    def __init__(self, pretrained, tokenizer, chat_format: ChatFormat, **kwargs):
        chat_format = chat_format.for_model(pretrained)
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **chat_format.lm_eval_args(tokenizer), **kwargs)
        self.chat_format = chat_format

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.chat_format.end_of_turn_ids:
            generation_kwargs.setdefault("eos_token_id", list(self.chat_format.end_of_turn_ids))
        return super()._model_generate(context, max_length, stop, **generation_kwargs)
