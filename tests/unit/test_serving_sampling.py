"""Pure sampling and detokenization functions (no model)."""

from __future__ import annotations

import pytest
import torch

from serving.detok import IncrementalDetokenizer
from serving.sampling import SamplingParams, make_generator, sample_token


def test_penalties_follow_openai_semantics():
    logits = torch.tensor([0.0, 3.0, 2.5, 0.0])
    counts = torch.tensor([0.0, 2.0, 0.0, 0.0])
    greedy = SamplingParams(temperature=0.0)
    assert sample_token(logits, greedy, make_generator(0), counts)[0] == 1
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.5)  # 3.0 - 2 * 0.5 = 2.0 < 2.5
    assert sample_token(logits, freq, make_generator(0), counts)[0] == 2
    pres = SamplingParams(temperature=0.0, presence_penalty=0.6)  # 3.0 - 0.6 = 2.4 < 2.5
    assert sample_token(logits, pres, make_generator(0), counts)[0] == 2
    assert logits.tolist() == [0.0, 3.0, 2.5, 0.0]  # the model's logits are not modified


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen_k = {
        sample_token(logits, SamplingParams(top_k=2), make_generator(s), None)[0]
        for s in range(200)
    }
    assert seen_k == {0, 1}
    seen_p = {
        sample_token(logits, SamplingParams(top_p=0.7), make_generator(s), None)[0]
        for s in range(200)
    }
    assert seen_p == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: nucleus is {0, 1}
    seen_all = {
        sample_token(logits, SamplingParams(), make_generator(s), None)[0] for s in range(400)
    }
    assert seen_all == {0, 1, 2, 3}


def test_same_seed_same_draws():
    logits = torch.randn(50)
    draws = [
        [sample_token(logits, SamplingParams(), g, None)[0] for _ in range(20)]
        for g in (make_generator(7), make_generator(7))
    ]
    assert draws[0] == draws[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(temperature=2.5),
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.2),
        dict(presence_penalty=3.0),
        dict(frequency_penalty=-2.1),
        dict(logprobs=21),
        dict(top_k=-2),
    ],
)
def test_out_of_range_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


class _CharTokenizer:
    """One character per token; id 0 is a special token that decodes to nothing."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join("" if i == 0 else chr(i) for i in ids)


def _run(text, stop):
    d = IncrementalDetokenizer(_CharTokenizer(), stop)
    deltas = []
    for ch in text:
        deltas.append(d.push(ord(ch)))
        if d.stopped:
            break
    deltas.append(d.flush())
    return deltas, d


def test_stop_string_spanning_tokens_is_held_back_and_cut():
    deltas, d = _run("hello world", ("lo w",))
    assert "".join(deltas) == "hel" and d.stopped
    assert all("lo" not in x for x in deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_match():
    deltas, d = _run("abcabd", ("abd!",))
    assert "".join(deltas) == "abcabd" and not d.stopped
    assert deltas[:3] == ["", "", "abc"] and deltas[-1] == "abd"  # "abd" waited for "!"


def test_earliest_of_several_stop_strings_wins():
    deltas, _ = _run("one two three", ("three", "two"))
    assert "".join(deltas) == "one "
