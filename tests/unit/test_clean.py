from data_pipelines.clean import content_hash, is_validation, normalize_text, redact_pii


def test_normalize_unicode_whitespace_and_controls():
    raw = "Cafe\u0301  au\tlait\r\n\r\n\r\n\r\nnext\x00 line  \n"
    assert normalize_text(raw) == "Café au lait\n\nnext line"
    assert normalize_text("ﬁ", "NFKC") == "fi"
    assert normalize_text("a  b", collapse_whitespace=False) == "a  b"


def test_redacts_each_kind_and_counts():
    text = (
        "Mail ana.b+x@example.co.uk or call +1 415 555 0132 or (020) 7946 0958; "
        "server 192.168.10.254; card 4111 1111 1111 1111; order 1234567890123 stays."
    )
    out, counts = redact_pii(text, ["email", "phone", "ip", "card"])
    assert "<EMAIL>" in out and "example" not in out
    assert out.count("<PHONE>") == 2
    assert "<IP>" in out and "192.168" not in out
    assert "<CARD>" in out and "4111" not in out
    # 13 digits failing the Luhn check are not a card (and not a phone either)
    assert "1234567890123" in out
    assert counts == {"email": 1, "phone": 2, "ip": 1, "card": 1}


def test_redaction_respects_kinds_and_leaves_plain_text():
    text = "write to bob@example.com from 10.0.0.1"
    out, counts = redact_pii(text, ["ip"])
    assert out == "write to bob@example.com from <IP>"
    assert counts == {"ip": 1}
    plain = "The year 2024 had 365 days and version 1.2.3 shipped."
    assert redact_pii(plain, ["email", "phone", "ip", "card"])[0] == plain


def test_hash_and_split_are_deterministic_and_proportional():
    assert content_hash("abc") == content_hash("abc") != content_hash("abd")
    assert len(content_hash("x")) == 16
    digests = [content_hash(f"doc {i}") for i in range(4000)]
    share = sum(is_validation(d, 0.1) for d in digests) / len(digests)
    assert 0.08 < share < 0.12
    assert not any(is_validation(d, 0.0) for d in digests)
