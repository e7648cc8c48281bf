"""Sampler, sampling parameters and incremental detokenization."""

import math

import pytest
import torch

from loraserve.detokenizer import IncrementalDetokenizer
from loraserve.sampler import SampleRequest, Sampler
from loraserve.sampling_params import SamplingParams


def req(params, prompt=(), output=(), seed=None, banned=()):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return SampleRequest(params, list(prompt), list(output), gen, list(banned))


def test_greedy_takes_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    out = Sampler()(logits, [req(SamplingParams(temperature=0))] * 2)
    assert [s.token_id for s in out] == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_breaks_ties_as_argmax_does_on_vocabulary_sized_rows(dtype):
    torch.manual_seed(0)
    logits = torch.randint(0, 3, (8, 49152)).to(dtype)     # every row full of ties at its maximum
    logits[3, 40000] = logits[3, 7] = 9                      # two maxima: the first wins
    out = Sampler()(logits, [req(SamplingParams(temperature=0))] * 8)
    assert [s.token_id for s in out] == logits.argmax(dim=-1).tolist()
    assert out[3].token_id == 7


def test_same_seed_same_tokens_regardless_of_batch():
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0)
    alone = [Sampler(seed=1)(logits, [req(p, seed=42)])[0].token_id for _ in range(1)]
    batched = Sampler(seed=2)(logits.repeat(3, 1), [req(p, seed=7), req(p, seed=42), req(p)])
    assert batched[1].token_id == alone[0]
    draws = {Sampler()(logits, [req(p, seed=s)])[0].token_id for s in range(40)}
    assert len(draws) > 1                                   # it does sample


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    top_k = {Sampler()(logits, [req(SamplingParams(temperature=1.0, top_k=2), seed=s)])[0].token_id for s in range(60)}
    assert top_k <= {0, 1} and len(top_k) == 2
    top_p = {Sampler()(logits, [req(SamplingParams(temperature=1.0, top_p=0.5), seed=s)])[0].token_id for s in range(60)}
    assert top_p == {0}                                       # p(token 0) = 0.64 >= 0.5


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = torch.zeros(3)
    sampler = Sampler(seed=3)
    for _ in range(2000):
        counts[sampler(logits, [req(SamplingParams(temperature=1.0))])[0].token_id] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_penalties():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    rep = Sampler()(logits, [req(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0])])
    assert rep[0].token_id == 1                               # 2.0 / 2 < 1.9
    pres = Sampler()(logits, [req(SamplingParams(temperature=0, presence_penalty=0.5), output=[0])])
    assert pres[0].token_id == 1
    freq = Sampler()(torch.tensor([[2.0, 1.0]]), [req(SamplingParams(temperature=0, frequency_penalty=0.4), output=[0, 0, 0])])
    assert freq[0].token_id == 1                              # 2.0 - 1.2 < 1.0


def test_banned_tokens_are_never_chosen():
    logits = torch.tensor([[9.0, 1.0, 0.0]])
    out = Sampler()(logits, [req(SamplingParams(temperature=0), banned=[0])])
    assert out[0].token_id == 1


def test_logprobs_of_chosen_and_top_n():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    s = Sampler()(logits, [req(SamplingParams(temperature=0, logprobs=2))])[0]
    expected = torch.log_softmax(logits[0], -1)
    assert s.token_id == 2 and math.isclose(s.logprob, expected[2].item(), rel_tol=1e-6)
    assert [t for t, _ in s.top_logprobs] == [2, 1]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 50}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
])
def test_invalid_sampling_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


class ByteTokenizer:
    """Each token is one UTF-8 byte, so characters span tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_multibyte_characters_split_across_tokens():
    text = "héllo 🙂 wörld"
    d = IncrementalDetokenizer(ByteTokenizer(), list(b"> "), stop=[])
    pieces = []
    for b in text.encode():
        d.append(b)
        pieces.append(d.delta(finished=False))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_stop_string_split_across_tokens():
    d = IncrementalDetokenizer(ByteTokenizer(), [], stop=["END"])
    streamed, matched = [], None
    for b in b"abc EN":
        assert d.append(b) is None
        streamed.append(d.delta(finished=False))
    assert "".join(streamed) == "abc "                       # "EN" held back: may start "END"
    matched = d.append(ord("D"))
    assert matched == "END" and d.text == "abc "
    assert d.delta(finished=True) == ""


def test_detokenizer_can_include_the_stop_string():
    d = IncrementalDetokenizer(ByteTokenizer(), [], stop=["!"], include_stop=True)
    for b in b"hi!":
        d.append(b)
    assert d.text == "hi!"
