import numpy as np
import pytest

from data_pipelines.pack import IGNORE_INDEX
from data_pipelines.tokenize import encode_conversation
from data_pipelines.tokenizer_train import END_OF_TURN, build_tokenizer

CORPUS = [
    "The small dog runs to the town. Anna lives in Brookfield and works as a baker.",
    "Review: a great movie with a happy ending. Is this review positive or negative?",
] * 50


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(iter(CORPUS), vocab_size=400, min_frequency=1, max_length=128)


def test_special_tokens_and_template_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.chat_template == tok.chat_template
    for t in (loaded.bos_token, loaded.eos_token, loaded.pad_token, END_OF_TURN):
        assert len(loaded(t, add_special_tokens=False)["input_ids"]) == 1
    msgs = [{"role": "user", "content": "hi"}]
    prompt = loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nhi<|end|><|assistant|>\n"


def test_loss_only_on_assistant_content_and_end_of_turn(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Review: a great movie. Is this review positive or negative?"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "And the town?"},
        {"role": "assistant", "content": "Brookfield"},
    ]
    ids, labels = encode_conversation(tok, msgs)
    end_id = tok.convert_tokens_to_ids(END_OF_TURN)
    text = tok.decode(ids[labels != IGNORE_INDEX])
    assert text == f"positive{END_OF_TURN}Brookfield{END_OF_TURN}"
    np.testing.assert_array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    # Exactly two <|end|> carry loss (the assistant turns'); the other three do not.
    ends = np.flatnonzero(ids == end_id)
    assert len(ends) == 5
    assert [labels[i] == end_id for i in ends] == [False, False, True, False, True]
    # The role marker and newline opening an assistant turn are prompt, not target.
    assistant_marker = tok.convert_tokens_to_ids("<|assistant|>")
    assert (labels[ids == assistant_marker] == IGNORE_INDEX).all()


def test_raylm_tokenizer_loads_as_autotokenizer_would_without_importing_torch(tok, tmp_path):
    """`raylm tokenizer train`'s plain tokenizer.json loads through its class directly: the same
    class and encodings as AutoTokenizer, and (in a fresh process, as a tokenizing actor starts)
    without AutoTokenizer's import of torch."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from data_pipelines.tokenize import load_tokenizer

    tok.save_pretrained(tmp_path)
    direct, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert type(direct) is type(auto)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "positive"}]
    assert direct.all_special_ids == auto.all_special_ids
    assert direct(CORPUS[0]).input_ids == auto(CORPUS[0]).input_ids
    assert direct.apply_chat_template(msgs) == auto.apply_chat_template(msgs)
    code = ("import sys; from data_pipelines.tokenize import load_tokenizer; "
            f"t = load_tokenizer({str(tmp_path)!r}); t('x'); print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
