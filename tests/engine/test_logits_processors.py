"""The sampler's per-request logits seam: a processor sees and edits only its own row, is
told the token its request got, and rows without one sample exactly as before; logit_bias
adds to one row; reported logprobs stay those of the model."""

from __future__ import annotations

import torch

from loraserve.sampler import SampleRequest, Sampler
from loraserve.sampling_params import SamplingParams

V = 50


class OnlyToken:
    """Allows one token; records what it saw."""

    def __init__(self, token: int):
        self.token, self.seen, self.accepted = token, [], []

    def apply(self, output_token_ids, logits):
        self.seen.append((list(output_token_ids), logits.shape))
        keep = logits[self.token].clone()
        logits.fill_(float("-inf"))
        logits[self.token] = keep

    def accept(self, token_id):
        self.accepted.append(token_id)


def request(params: SamplingParams, out=()) -> SampleRequest:
    return SampleRequest(params, [1, 2, 3], list(out), None, [])


def test_a_processor_edits_only_its_row_in_a_mixed_batch():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    forced = OnlyToken(7)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logits_processors=[forced], logprobs=1),
              SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0)]
    samples = Sampler()(logits, [request(p, out=[5] if i == 1 else []) for i, p in enumerate(params)])
    assert samples[1].token_id == 7 and forced.accepted == [7]
    assert forced.seen == [([5], torch.Size([V]))]
    assert torch.equal(logits, before), "the runner's logits must not change (logprobs come from them)"
    plain = Sampler()(before.clone(), [request(SamplingParams(temperature=0)), request(SamplingParams(temperature=0)),
                                       request(SamplingParams(temperature=0.8, seed=1)),
                                       request(SamplingParams(temperature=0))])
    for i in (0, 2, 3):
        assert samples[i].token_id == plain[i].token_id, "a row without a processor sampled differently"
    assert samples[1].logprob == float(torch.log_softmax(before[1], -1)[7])


def test_logit_bias_moves_its_own_row():
    logits = torch.zeros(2, V)
    logits[:, 3] = 1.0
    biased = SamplingParams(temperature=0, logit_bias={11: 100.0, 3: -100.0})
    samples = Sampler()(logits, [request(biased), request(SamplingParams(temperature=0))])
    assert [s.token_id for s in samples] == [11, 3]


def test_logit_bias_is_checked():
    for bad in ({-1: 1.0}, {3: 101.0}):
        try:
            SamplingParams(logit_bias=bad)
        except ValueError as e:
            assert "logit_bias" in str(e)
        else:
            raise AssertionError(f"{bad} accepted")


def test_a_grammar_processor_drives_random_logits_to_a_fitting_answer_then_eos(tokenizer_dir):
    import json

    import jsonschema
    from transformers import AutoTokenizer

    from loraserve.grammar import GrammarCompiler

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    compiler = GrammarCompiler(tok, len(tok) + 64)   # logits wider than the tokenizer, as many models have
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "maximum": 9}},
              "required": ["k", "n"], "additionalProperties": False}
    processor = compiler.processor(compiler.json_schema(schema))
    g, out = torch.Generator().manual_seed(0), []
    while not out or out[-1] != tok.eos_token_id:
        row = torch.randn(len(tok) + 64, generator=g)
        processor.apply(out, row)
        assert torch.isinf(row[len(tok):]).all(), "ids past the tokenizer must stay masked"
        out.append(int(row.argmax()))
        processor.accept(out[-1])
        assert len(out) < 40
    jsonschema.validate(json.loads(tok.decode(out[:-1])), schema)

    broken = compiler.processor(compiler.json_schema(schema))
    broken.apply([], torch.zeros(len(tok) + 64))
    broken.accept(tok.encode("x", add_special_tokens=False)[0])   # a token the grammar refused, forced in
    row = torch.randn(len(tok) + 64, generator=g)
    broken.apply([1], row)
    assert int(row.argmax()) == tok.eos_token_id and torch.isinf(row).sum() == row.numel() - 1
