"""A conversation to prompt ids through the model's own chat template: the one rendering
the offline `LLM.chat` and the HTTP chat route share, so both send the model the same ids.

The template's text already holds the special tokens it wants (BOS, role markers), so it
is encoded without the tokenizer adding its own.
"""

from __future__ import annotations


def chat_prompt_ids(tokenizer, conversation: list[dict], tools: list[dict] | None = None) -> list[int]:
    text = tokenizer.apply_chat_template(conversation, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)
