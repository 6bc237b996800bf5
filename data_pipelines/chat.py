"""What a tokenizer's chat template says about turns: the one definition of "end of turn".

Export (``generation_config.json`` eos ids), eval and serving (stop ids of chat requests) and SFT
labels all ask this module, so a family's end-of-turn token is found the same way everywhere: from
the template itself, not from a list of family names. Pure functions over a transformers tokenizer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KNOWN_END_OF_TURN", "end_of_turn_ids", "end_of_turn_token"]

# Tokens that close an assistant turn in common templates: raylm's own, Llama 3, Qwen/ChatML,
# Gemma, Phi-3 (also <|end|>). Only a fallback for templates whose rendering shows none.
KNOWN_END_OF_TURN = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>")
_PROBE = "raylm-probe-7f3a"  # assistant content whose surroundings the template reveals


def _rendered_suffix(tok: Any) -> str | None:
    """The text a template writes right after an assistant message's content, or None."""
    if not getattr(tok, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception:  # a template with its own rules (role order, tools); fall back to names
        return None
    if not isinstance(text, str) or _PROBE not in text:
        return None
    return text[text.rindex(_PROBE) + len(_PROBE) :]


def end_of_turn_token(tok: Any) -> str | None:
    """The special token that closes an assistant turn in ``tok``'s chat template.

    The first special token the template writes after the assistant's content (Llama 3
    ``<|eot_id|>``, Qwen ``<|im_end|>``, Gemma ``<end_of_turn>``, Mistral ``</s>``, raylm
    ``<|end|>``); else the first of :data:`KNOWN_END_OF_TURN` in the vocabulary; else None.
    """
    suffix = _rendered_suffix(tok)
    if suffix:
        special = set(tok.all_special_tokens) | {
            t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special
        }
        ids = tok(suffix, add_special_tokens=False)["input_ids"]
        for token in tok.convert_ids_to_tokens(ids):
            if token in special:
                return token
    vocab = tok.get_vocab()
    return next((t for t in KNOWN_END_OF_TURN if t in vocab), None)


def end_of_turn_ids(tok: Any) -> tuple[int, ...]:
    """Stop ids for a chat reply: the template's end-of-turn token, plus any other known
    end-of-turn token the vocabulary has (a Llama 3 base also stops on ``<|eot_id|>``)."""
    vocab = tok.get_vocab()
    first = end_of_turn_token(tok)
    names = [first] if first else []
    names += [t for t in KNOWN_END_OF_TURN if t in vocab and t != first]
    return tuple(dict.fromkeys(vocab[n] for n in names if n in vocab))
