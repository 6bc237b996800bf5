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
