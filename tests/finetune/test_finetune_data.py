"""Training data: line-by-line checks with the line number in every message, and labels that
cover the assistant's tokens only, on a prompt that is exactly what serving encodes."""

from __future__ import annotations

import json

import pytest

from loraserve.adapters.finetune import FinetuneConfig, auto_hyperparameters, split_eval
from loraserve.adapters.finetune_data import CHAT, COMPLETION, IGNORE, DataError, encode_chat, \
    encode_completion, parse_jsonl

GOOD = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}]}


def lines(*rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def test_both_formats_parse_and_blank_lines_are_skipped():
    chat = parse_jsonl(lines(GOOD, "", GOOD) + b"\n\n")
    assert chat.format == CHAT and len(chat.examples) == 2
    plain = parse_jsonl(lines({"prompt": "2+2=", "completion": "4"}))
    assert plain.format == COMPLETION and plain.examples == [{"prompt": "2+2=", "completion": "4"}]


@pytest.mark.parametrize("rows, words", [
    ((GOOD, "{not json"), ["line 2", "not valid JSON"]),
    ((GOOD, GOOD, [1, 2]), ["line 3", "JSON object"]),
    (({"text": "hi"},), ["line 1", "messages", "prompt"]),
    (({"messages": []},), ["line 1", "non-empty"]),
    (({"messages": [{"role": "user", "content": "Hi"}]},), ["line 1", "no assistant message"]),
    (({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},),
     ["line 1", "messages[0]", "role 'tool'"]),
    (({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},),
     ["messages[0]", "'content'"]),
    (({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},),
     ["messages[1]", "weight"]),
    ((GOOD, {"prompt": "a", "completion": "b"}), ["line 2", "line 1", "one format per file"]),
    (({"prompt": "a", "completion": ""},), ["line 1", "'completion' is empty"]),
    (({"prompt": 1, "completion": "b"},), ["line 1", "'prompt' must be a string"]),
    ((), ["no examples"]),
    (("", "  "), ["no examples"]),
])
def test_bad_lines_are_named(rows, words):
    with pytest.raises(DataError) as e:
        parse_jsonl(lines(*rows))
    for word in words:
        assert word in str(e.value)


def test_not_utf8():
    with pytest.raises(DataError, match="not UTF-8"):
        parse_jsonl(b"\xff\xfe{}")


def test_chat_labels_cover_the_assistant_turns_only(smollm_tokenizer):
    tok = smollm_tokenizer
    messages = [{"role": "user", "content": "Say the word."}, {"role": "assistant", "content": "ZEBRA"},
                {"role": "user", "content": "Again."}, {"role": "assistant", "content": "ZEBRA again", "weight": 0},
                {"role": "user", "content": "Once more."}, {"role": "assistant", "content": "ZEBRA 3"}]
    e = encode_chat(tok, messages)
    assert len(e.input_ids) == len(e.labels)
    trained = tok.decode([t for t, label in zip(e.input_ids, e.labels) if label != IGNORE])
    assert trained.count("<|im_end|>") == 2 and "ZEBRA" in trained and "ZEBRA 3" in trained
    assert "again" not in trained and "Say the word" not in trained and "assistant" not in trained
    # the prompt before the first answer is exactly what /v1/chat/completions encodes
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    served = tok.encode(prompt, add_special_tokens=False)
    assert e.input_ids[:len(served)] == served and set(e.labels[:len(served)]) == {IGNORE}


def test_completion_labels_end_with_eos(smollm_tokenizer):
    tok = smollm_tokenizer
    e = encode_completion(tok, "Q: 2+2\nA:", " 4")
    prompt = tok.encode("Q: 2+2\nA:")
    assert e.input_ids[:len(prompt)] == prompt and set(e.labels[:len(prompt)]) == {IGNORE}
    assert e.labels[len(prompt):] == e.input_ids[len(prompt):] and e.input_ids[-1] == tok.eos_token_id


def test_config_ranges_and_split():
    for bad in (dict(rank=0), dict(epochs=51), dict(batch_size=True), dict(learning_rate=0.0),
                dict(alpha=-1.0), dict(targets=("embed_tokens",)), dict(eval_fraction=0.9)):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)
    train, held = split_eval(list(range(20)), 0.1, 100, seed=1)
    assert len(held) == 2 and sorted(train + held) == list(range(20))
    assert split_eval(list(range(4)), 0.1, 100, seed=1) == (list(range(4)), [])


def test_auto_hyperparameters_from_size_and_length():
    small = auto_hyperparameters(40, mean_tokens=30)
    assert (small.n_epochs, small.batch_size, small.learning_rate_multiplier) == (3, 2, 5.0)
    assert auto_hyperparameters(20, 30).n_epochs == 5                # about 100 examples seen
    assert auto_hyperparameters(100_000, 30).n_epochs == 1           # at most 25000 seen
    assert auto_hyperparameters(1000, 30).batch_size == 16
    assert auto_hyperparameters(1000, 3000).batch_size == 2          # long examples, small steps
    kept = auto_hyperparameters(40, 30, n_epochs=1, batch_size=8)    # given values stay; the rate follows them
    assert (kept.n_epochs, kept.batch_size, kept.learning_rate_multiplier) == (1, 8, 10.0)
    zero = auto_hyperparameters(40, 30, n_epochs=0, batch_size=0)    # a bad value is not replaced by auto...
    assert (zero.n_epochs, zero.batch_size) == (0, 0)
    with pytest.raises(ValueError, match="epochs"):                  # ...it is refused where it is checked
        FinetuneConfig(epochs=zero.n_epochs, batch_size=zero.batch_size)

