"""The continuous-batching engine on a tiny random Llama, no Ray: exactness against `transformers`
greedy generate, batching invariance, seeded sampling, stop strings, usage, cancellation, budgets."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from serving.backend import EngineOverloaded, RequestTimeout, Usage
from serving.config import EngineConfig
from serving.engine import Engine
from serving.sampling import SamplingParams

GREEDY = dict(temperature=0.0)
PROMPTS = [
    "Ben was a librarian in the town of",
    "Nothing made Ben happier than",
    "On Sunday",
    "The parrot",
    "Rewrite in Zorbish: the teacher walks behind every red small ball",
    "a",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(tiny_model_dir, EngineConfig(max_num_seqs=16, max_batched_tokens=512))
    yield eng
    eng.shutdown()


def _ids(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompts(engine, n):
    """n distinct prompts of varied lengths."""
    return [_ids(engine, f"{PROMPTS[i % len(PROMPTS)]} {i}" * (1 + i % 3)) for i in range(n)]


async def _collect_events(engine, ids, params):
    return [ev async for ev in engine.submit(ids, params)]


async def _collect(engine, ids, params, order=None, tag=None):
    out, text, last = [], [], None
    async for ev in engine.submit(ids, params):
        out += ev.token_ids
        text.append(ev.text)
        last = ev
    if order is not None:
        order.append(tag)
    return out, "".join(text), last


def test_greedy_equals_transformers_generate(engine):
    for text in PROMPTS:
        ids = _ids(engine, text)
        ref = engine.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
        )[0, len(ids) :].tolist()
        got = engine.generate_sync(ids, SamplingParams(max_tokens=24, **GREEDY))
        assert got.token_ids == ref, text
        assert len(set(ref)) > 3, "degenerate tiny model: test would prove nothing"


def test_32_concurrent_greedy_requests_equal_isolated_runs(engine):
    prompts = _prompts(engine, 32)
    params = [SamplingParams(max_tokens=6 + (i * 7) % 23, **GREEDY) for i in range(32)]
    isolated = [
        engine.generate_sync(p, sp).token_ids for p, sp in zip(prompts, params, strict=True)
    ]

    async def together():
        return await asyncio.gather(
            *(_collect(engine, p, sp) for p, sp in zip(prompts, params, strict=True))
        )

    results = asyncio.run(together())
    for i, (ids, _, last) in enumerate(results):
        assert ids == isolated[i], f"request {i} changed when batched"
        assert last.usage.completion_tokens == len(ids)
    assert engine.stats()["running"] == 0


def test_short_request_joins_a_long_one_and_finishes_first(engine):
    long_ids, short_ids = _ids(engine, PROMPTS[0]), _ids(engine, PROMPTS[4])
    long_p, short_p = (
        SamplingParams(max_tokens=200, **GREEDY),
        SamplingParams(max_tokens=5, **GREEDY),
    )
    long_ref = engine.generate_sync(long_ids, long_p).token_ids
    short_ref = engine.generate_sync(short_ids, short_p).token_ids

    async def run():
        order: list[str] = []
        long_task = asyncio.create_task(_collect(engine, long_ids, long_p, order, "long"))
        while engine.stats()["running"] == 0:  # the long one is decoding
            await asyncio.sleep(0.001)
        short = await _collect(engine, short_ids, short_p, order, "short")
        return order, await long_task, short

    order, long_out, short_out = asyncio.run(run())
    assert order == ["short", "long"]
    assert long_out[0] == long_ref and short_out[0] == short_ref
    assert long_out[2].finish_reason == "length" and len(long_ref) == 200


def test_seeded_sampling_is_independent_of_batch_mates(engine):
    ids = _ids(engine, PROMPTS[1])
    seeded = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.95, top_k=100, seed=1234)
    alone = engine.generate_sync(ids, seeded).token_ids

    async def crowded():
        mates = [
            _collect(engine, p, SamplingParams(max_tokens=5 + i, temperature=1.0))
            for i, p in enumerate(_prompts(engine, 7))
        ]
        results = await asyncio.gather(_collect(engine, ids, seeded), *mates)
        return results[0][0]

    assert asyncio.run(crowded()) == alone
    other = engine.generate_sync(ids, SamplingParams(max_tokens=30, temperature=1.0, seed=99))
    assert other.token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    ids = _ids(engine, PROMPTS[2])
    greedy = engine.generate_sync(ids, SamplingParams(max_tokens=12, **GREEDY)).token_ids
    for sp in (dict(top_k=1), dict(top_p=1e-6)):
        got = engine.generate_sync(ids, SamplingParams(max_tokens=12, temperature=1.0, **sp))
        assert got.token_ids == greedy


def test_stop_string_truncates_text_and_never_streams_it(engine):
    ids = _ids(engine, PROMPTS[0])
    full = engine.generate_sync(ids, SamplingParams(max_tokens=40, **GREEDY))
    assert len(full.text) > 12
    stop = full.text[8:11]  # three characters from the middle (may span tokens)
    cut = full.text.index(stop)

    async def streamed():
        return [
            ev
            async for ev in engine.submit(
                ids, SamplingParams(max_tokens=40, stop=(stop,), **GREEDY)
            )
        ]

    events = asyncio.run(streamed())
    text = "".join(ev.text for ev in events)
    assert text == full.text[:cut]
    assert events[-1].finish_reason == "stop"
    assert all(stop not in ev.text for ev in events)
    # Tokens after the one completing the stop string are not generated (and not counted).
    assert events[-1].usage.completion_tokens == len(events) < len(full.token_ids)


def test_usage_counts_and_finish_reasons(engine):
    ids = _ids(engine, PROMPTS[3])
    got = engine.generate_sync(ids, SamplingParams(max_tokens=7, **GREEDY))
    assert got.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), 7)
    assert got.usage.total_tokens == len(ids) + 7
    # Force an eos: make the greedy choice itself a stop token.
    first = got.token_ids[0]
    stopped = engine.generate_sync(
        ids, SamplingParams(max_tokens=7, stop_token_ids=(first,), **GREEDY)
    )
    assert stopped.finish_reason == "stop" and stopped.token_ids == [first]
    assert stopped.usage.completion_tokens == 1 and stopped.text == ""


def test_logprobs_are_the_models_distribution(engine):
    ids = _ids(engine, PROMPTS[5])
    got = engine.generate_sync(ids, SamplingParams(max_tokens=5, logprobs=3, **GREEDY))
    assert len(got.logprobs) == 5
    for tok, lp in zip(got.token_ids, got.logprobs, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy: the top-1 alternative
        assert lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def _reference_prompt_logprobs(engine, ids):
    """(len(ids) - 1, vocab) log-softmax of one unpadded transformers forward over ``ids``."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def test_prompt_logprobs_equal_a_plain_forward_whatever_shares_the_prefill(engine):
    """Scoring rows of different lengths (left-padded together) and a plain request admitted in
    the same step: each prompt's logprobs, ranks and top-k equal an unpadded forward, and the
    plain request's tokens equal its run alone."""
    prompts = [_ids(engine, p) for p in PROMPTS[:4]]
    plain_ids = _ids(engine, PROMPTS[4])
    plain_alone = engine.generate_sync(plain_ids, SamplingParams(max_tokens=6, **GREEDY))

    async def together():
        scoring = [
            _collect_events(engine, p, SamplingParams(max_tokens=m, prompt_logprobs=3, **GREEDY))
            for p, m in zip(prompts, (0, 1, 0, 4), strict=True)
        ]
        plain = _collect_events(engine, plain_ids, SamplingParams(max_tokens=6, **GREEDY))
        return await asyncio.gather(plain, *scoring)

    plain_events, *scored = asyncio.run(together())
    assert [t for ev in plain_events for t in ev.token_ids] == plain_alone.token_ids
    assert all(ev.prompt_logprobs is None for ev in plain_events)
    for ids, events, max_tokens in zip(prompts, scored, (0, 1, 0, 4), strict=True):
        first = events[0].prompt_logprobs
        assert all(ev.prompt_logprobs is None for ev in events[1:])  # sent once
        assert len(first) == len(ids) and first[0] is None
        want = _reference_prompt_logprobs(engine, ids)
        for pos, lp in enumerate(first[1:]):
            row = want[pos]
            assert lp.token_id == ids[pos + 1]
            assert lp.logprob == pytest.approx(float(row[ids[pos + 1]]), abs=1e-4)
            assert lp.rank == int((row > row[ids[pos + 1]]).sum()) + 1
            assert [t for t, _ in lp.top] == torch.topk(row, 3).indices.tolist()
        assert len(set(lp.rank for lp in first[1:])) > 1, "tiny model: ranks all equal"
        generated = [t for ev in events for t in ev.token_ids]
        assert len(generated) == max_tokens
        assert events[-1].finish_reason == "length"
        assert events[-1].usage == Usage(len(ids), max_tokens)


def test_max_tokens_zero_scores_without_decoding_and_frees_its_slot(engine):
    ids = _ids(engine, PROMPTS[0])
    before = engine.stats()["completion_tokens"]
    got = engine.generate_sync(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert got.token_ids == [] and got.text == "" and got.finish_reason == "length"
    assert got.usage == Usage(len(ids), 0)
    assert [lp.top for lp in got.prompt_logprobs[1:]] == [()] * (len(ids) - 1)
    assert engine.stats()["completion_tokens"] == before and engine.stats()["running"] == 0
    one = engine.generate_sync(ids[:1], SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert one.prompt_logprobs == (None,)
    with pytest.raises(ValueError, match="needs prompt_logprobs"):
        SamplingParams(max_tokens=0)


def test_cancellation_frees_the_slot(tiny_model_dir):
    eng = Engine(tiny_model_dir, EngineConfig(max_num_seqs=1, max_waiting=0, warmup=False))
    ids = _ids(eng, PROMPTS[0])
    try:

        async def run():
            stream = eng.submit(ids, SamplingParams(max_tokens=200, **GREEDY))
            await stream.__anext__()
            with pytest.raises(EngineOverloaded):  # one slot, no queue: busy
                eng.submit(ids, SamplingParams(max_tokens=2, **GREEDY))
            stream.cancel()
            deadline = time.monotonic() + 5
            while eng.stats()["running"] and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert eng.stats()["running"] == 0
            return await _collect(eng, ids, SamplingParams(max_tokens=3, **GREEDY))

        ids_out, _, last = asyncio.run(run())
        assert len(ids_out) == 3 and last.finish_reason == "length"
        assert eng.counters["completion_tokens"] < 100  # the cancelled one stopped early
    finally:
        eng.shutdown()


def test_first_token_leaves_before_the_next_decode(tiny_model_dir):
    """TTFT is one prefill: the first token is delivered before the step goes on to decode the batch
    (which would add a whole decode step to every request's TTFT)."""
    import queue

    eng = Engine(tiny_model_dir, EngineConfig(warmup=False))
    decodes, events = [0], queue.SimpleQueue()
    decode = eng._decode

    def counting_decode():
        decodes[0] += 1
        decode()

    eng._decode = counting_decode  # the engine thread calls self._decode() on every step
    try:
        # emit runs on the engine thread: record how many decodes ran before each event left.
        emit = lambda item: events.put((decodes[0], item))  # noqa: E731
        eng._enqueue(_ids(eng, PROMPTS[2]), SamplingParams(max_tokens=3, **GREEDY), emit)
        got = [events.get(timeout=30) for _ in range(3)]
        assert [n for n, _ in got] == [0, 1, 2]
        assert got[-1][1].finish_reason == "length"
    finally:
        eng.shutdown()


def test_request_timeout_ends_the_request(tiny_model_dir):
    eng = Engine(tiny_model_dir, EngineConfig(request_timeout_s=0.05, warmup=False))
    try:
        with pytest.raises(RequestTimeout):
            eng.generate_sync(
                _ids(eng, PROMPTS[0]), SamplingParams(max_tokens=240, ignore_eos=True, **GREEDY)
            )
        assert eng.stats()["running"] == 0
    finally:
        eng.shutdown()


def test_prefill_budget_still_admits_everything(tiny_model_dir):
    # A budget smaller than two prompts forces one-at-a-time prefill; outputs must not change.
    eng = Engine(tiny_model_dir, EngineConfig(max_num_seqs=4, max_batched_tokens=16, warmup=False))
    try:
        prompts = _prompts(eng, 6)
        sp = SamplingParams(max_tokens=8, **GREEDY)
        isolated = [eng.generate_sync(p, sp).token_ids for p in prompts]

        async def together():
            return await asyncio.gather(*(_collect(eng, p, sp) for p in prompts))

        assert [r[0] for r in asyncio.run(together())] == isolated
    finally:
        eng.shutdown()


def test_shutdown_fails_waiting_requests_instead_of_hanging(tiny_model_dir):
    from serving.backend import EngineShutdown

    eng = Engine(tiny_model_dir, EngineConfig(warmup=False))
    eng.shutdown(timeout_s=0.0)
    with pytest.raises(EngineShutdown):
        eng.generate_sync(_ids(eng, "x"), SamplingParams(max_tokens=2))


def test_graceful_shutdown_finishes_in_flight_work_then_fails_the_rest(tiny_model_dir):
    from serving.backend import EngineShutdown

    eng = Engine(tiny_model_dir, EngineConfig(warmup=False))
    ids = _ids(eng, PROMPTS[0])

    async def run(grace_s):
        stream = eng.submit(ids, SamplingParams(max_tokens=200, ignore_eos=True, **GREEDY))
        await stream.__anext__()
        loop = asyncio.get_running_loop()
        closing = loop.run_in_executor(None, eng.shutdown, grace_s)
        try:
            return [ev async for ev in stream]
        finally:
            await closing

    events = asyncio.run(run(grace_s=30.0))  # long grace: the stream completes normally
    assert events[-1].finish_reason == "length" and events[-1].usage.completion_tokens == 200

    eng = Engine(tiny_model_dir, EngineConfig(warmup=False))
    with pytest.raises(EngineShutdown):  # no grace: the in-flight stream gets an error, not a hang
        asyncio.run(run(grace_s=0.0))


class _Recorder:
    def __init__(self):
        self.finished, self.steps = [], 0

    def request_finished(self, stats):
        self.finished.append(stats)

    def step(self, running, waiting):
        self.steps += 1


def test_observer_gets_exact_request_stats(tiny_model_dir):
    rec = _Recorder()
    eng = Engine(tiny_model_dir, EngineConfig(warmup=False), observer=rec)
    ids = _ids(eng, PROMPTS[0])
    try:
        eng.generate_sync(ids, SamplingParams(max_tokens=6, ignore_eos=True, **GREEDY))

        async def cancel_one():
            stream = eng.submit(ids, SamplingParams(max_tokens=200, **GREEDY))
            await stream.__anext__()
            stream.cancel()

        asyncio.run(cancel_one())
        assert _wait_until(lambda: len(rec.finished) == 2)
    finally:
        eng.shutdown()
    done, cancelled = rec.finished
    assert (done.outcome, done.prompt_tokens, done.completion_tokens) == ("length", len(ids), 6)
    assert 0 < done.ttft_s <= done.e2e_s
    assert cancelled.outcome == "cancelled" and cancelled.completion_tokens < 200
    assert rec.steps >= 6


def _wait_until(predicate, timeout_s=5.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not predicate():
        time.sleep(0.01)
    return predicate()


def make_lora(model_dir, out, seed=3):
    """A random (non-zero) LoRA adapter over the tiny model, saved as a PEFT dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, cfg).save_pretrained(str(out))
    return out


def test_lora_adapter_is_merged_and_matches_peft_generate(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_lora(tiny_model_dir, tmp_path / "lora")
    eng = Engine(tiny_model_dir, EngineConfig(warmup=False), adapter=adapter)
    try:
        ids = _ids(eng, PROMPTS[1])
        got = eng.generate_sync(ids, SamplingParams(max_tokens=16, **GREEDY)).token_ids
    finally:
        eng.shutdown()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), use_safetensors=True)
    plain = base.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[
        0, len(ids) :
    ].tolist()
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ref = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False)[
        0, len(ids) :
    ]
    assert got == ref.tolist()
    assert got != plain, "adapter had no effect: the test would prove nothing"
