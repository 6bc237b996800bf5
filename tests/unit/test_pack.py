import numpy as np
import pytest

from data_pipelines.pack import IGNORE_INDEX, ConversationPacker, DocumentPacker, segment_positions

PAD = 0


def _docs(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, size=rng.integers(1, 40)).astype(np.int32) for _ in range(n)]


@pytest.mark.parametrize("seq_len", [8, 16, 37])
def test_document_packing_reproduces_the_stream(seq_len):
    docs = _docs(seq_len, 60)
    packer = DocumentPacker(seq_len, PAD)
    rows = [r for d in docs for r in packer.add(d)] + list(packer.flush())
    assert all(len(r.input_ids) == seq_len == len(r.position_ids) for r in rows)
    real = np.concatenate([r.input_ids[: r.real_tokens] for r in rows])
    np.testing.assert_array_equal(real, np.concatenate(docs))
    assert all(r.real_tokens == seq_len for r in rows[:-1])
    assert (rows[-1].input_ids[rows[-1].real_tokens :] == PAD).all()


def test_positions_restart_at_documents_and_rows():
    packer = DocumentPacker(8, PAD)
    docs = [np.arange(10, 15), np.arange(20, 27), np.arange(30, 32)]  # lengths 5, 7, 2
    rows = [r for d in docs for r in packer.add(d)] + list(packer.flush())
    # row 0: doc0 (5) + first 3 of doc1; row 1: rest of doc1 (4) + doc2 (2) + 2 pads
    assert rows[0].position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[1].position_ids.tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    assert rows[1].input_ids.tolist() == [23, 24, 25, 26, 30, 31, PAD, PAD]
    assert rows[1].real_tokens == 6


def test_long_document_spans_many_rows():
    packer = DocumentPacker(4, PAD)
    rows = list(packer.add(np.arange(1, 11))) + list(packer.flush())
    assert [r.input_ids.tolist() for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert all(r.position_ids[:2].tolist() == [0, 1] for r in rows)


def test_conversation_packing_keeps_conversations_whole():
    packer = ConversationPacker(10, PAD, pack=True)
    convs = [(np.arange(1, 5), np.array([-100, -100, 3, 4])), (np.arange(5, 10), np.arange(5, 10))]
    convs.append((np.arange(10, 14), np.array([-100, 11, 12, 13])))
    rows = [r for ids, lab in convs for r in packer.add(ids, lab)] + list(packer.flush())
    assert len(rows) == 2
    assert rows[0].input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, PAD]
    assert rows[0].labels.tolist() == [-100, -100, 3, 4, 5, 6, 7, 8, 9, IGNORE_INDEX]
    assert rows[0].position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0]
    assert rows[1].real_tokens == 4


def test_unpacked_conversations_get_a_row_each_and_overlong_is_an_error():
    packer = ConversationPacker(6, PAD, pack=False)
    rows = list(packer.add(np.arange(1, 3), np.arange(1, 3)))
    rows += list(packer.add(np.arange(3, 5), np.arange(3, 5))) + list(packer.flush())
    assert [r.real_tokens for r in rows] == [2, 2]
    with pytest.raises(ValueError, match="exceeds seq_len"):
        list(packer.add(np.arange(7), np.arange(7)))


def test_segment_positions():
    assert segment_positions([2, 3, 1]).tolist() == [0, 1, 0, 1, 2, 0]
    assert segment_positions([]).tolist() == []
