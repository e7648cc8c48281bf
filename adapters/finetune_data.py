"""Fine-tuning data: JSONL checked line by line, then tokenized with the loss on answers only.

One format per file, both OpenAI's:
    {"messages": [{"role": "system" | "developer" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}
A chat example is rendered with the base model's chat template exactly as serving renders
a prompt; its labels are the assistant turns' tokens (text and end-of-turn token) and
IGNORE elsewhere, so training never teaches the model to write the user's part. An
assistant message with `"weight": 0` is context only, as in OpenAI's format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CHAT = "chat"
COMPLETION = "prompt-completion"
ROLES = ("system", "developer", "user", "assistant")
IGNORE = -100           # the label of a token the loss skips (torch's cross_entropy ignore_index)


class DataError(ValueError):
    """A bad training file; the message names the line and the problem."""


@dataclass(frozen=True)
class TrainingData:
    format: str                 # CHAT or COMPLETION
    examples: list[dict]        # the parsed lines, blank lines skipped


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]           # labels[i] = input_ids[i] where the loss counts, else IGNORE

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def parse_jsonl(data: bytes) -> TrainingData:
    """Check every line; raise DataError naming the first bad one."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"the file is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8 JSONL") from None
    examples, kind, first = [], None, 0
    for number, line in enumerate(text.split("\n"), 1):   # not splitlines: U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None
        line_kind = check_example(obj, number)
        if kind is None:
            kind, first = line_kind, number
        elif line_kind != kind:
            raise DataError(f"line {number}: a {line_kind} example, but line {first} is {kind}; "
                            "use one format per file")
        examples.append(obj)
    if not examples:
        raise DataError("the file has no examples; write one JSON object per line, "
                        'e.g. {"messages": [{"role": "user", "content": "Hi"}, '
                        '{"role": "assistant", "content": "Hello"}]}')
    return TrainingData(kind, examples)


def check_example(obj, number: int) -> str:
    """The example's format (CHAT or COMPLETION); DataError when it is neither."""
    if not isinstance(obj, dict):
        raise DataError(f"line {number}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        _check_messages(obj["messages"], number)
        return CHAT
    if "prompt" in obj or "completion" in obj:
        for field in ("prompt", "completion"):
            if not isinstance(obj.get(field), str):
                raise DataError(f"line {number}: '{field}' must be a string "
                                f"(got {type(obj.get(field)).__name__})")
        if not obj["completion"]:
            raise DataError(f"line {number}: 'completion' is empty; there is nothing to learn from this line")
        return COMPLETION
    raise DataError(f"line {number}: expected {{\"messages\": [...]}} (chat) or {{\"prompt\": ..., "
                    f"\"completion\": ...}}; got the keys {sorted(obj)}")


def _check_messages(messages, number: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"line {number}: 'messages' must be a non-empty list of messages")
    trained = 0
    for i, m in enumerate(messages):
        where = f"line {number}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: role {role!r} is not supported; use one of {', '.join(ROLES)}")
        if "tool_calls" in m or "function_call" in m:
            raise DataError(f"{where}: tool and function calls are not supported in training data")
        message_text(m, where)
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DataError(f"{where}: 'weight' must be 0 or 1, got {weight!r}")
        if "weight" in m and role != "assistant":
            raise DataError(f"{where}: only assistant messages take a 'weight'")
        trained += role == "assistant" and weight == 1
    if not trained:
        raise DataError(f"line {number}: no assistant message to learn from; add one "
                        '({"role": "assistant", "content": ...}) with weight 1')


def message_text(m: dict, where: str = "message") -> str:
    """A message's text; a list of text parts is joined by newlines, as serving does."""
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise DataError(f"{where}: 'content' must be a string or a list of text parts")


def encode(tokenizer, data: TrainingData, max_len: int) -> list[Encoded]:
    """Token ids and labels of every example, cut to max_len; examples left with no
    trained token (a prompt longer than max_len) are dropped."""
    if data.format == CHAT:
        encoded = [encode_chat(tokenizer, ex["messages"]) for ex in data.examples]
    else:
        encoded = [encode_completion(tokenizer, ex["prompt"], ex["completion"]) for ex in data.examples]
    cut = [Encoded(e.input_ids[:max_len], e.labels[:max_len]) for e in encoded]
    return [e for e in cut if e.num_trained]


def encode_chat(tokenizer, messages: list[dict]) -> Encoded:
    """Render the conversation turn by turn: the text up to each assistant turn (with the
    generation prompt, exactly the prompt serving would see) is context, the turn is trained."""
    conversation = [{"role": "system" if m["role"] == "developer" else m["role"], "content": message_text(m)}
                    for m in messages]
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""

    def extend(text: str, trained: bool) -> None:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE] * len(piece))

    for i, m in enumerate(conversation):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(conversation[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(conversation[: i + 1], tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DataError("the model's chat template does not render a conversation turn by turn "
                            "(an earlier turn changes when a later one is added); "
                            "train on the prompt/completion format instead")
        extend(prompt[len(rendered):], trained=False)
        extend(full[len(prompt):], trained=messages[i].get("weight", 1) == 1)
        rendered = full
    return Encoded(ids, labels)


def encode_completion(tokenizer, prompt: str, completion: str) -> Encoded:
    """The prompt as /v1/completions encodes it, then the completion and end-of-sequence."""
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    answer = tokenizer.encode(completion, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    return Encoded(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer)
