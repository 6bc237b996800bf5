"""The config reference in docs/config.md, generated from the schema so the two cannot drift.

python -m cluster.docs            # print the reference
python -m cluster.docs --write    # rewrite the docs/config.md section between the markers
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from cluster.config import RaylmConfig

__all__ = ["DOC", "END", "START", "config_reference", "update_doc"]

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _type_name(annotation) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if _is_model(field.annotation):
            rows += _rows(field.annotation, f"{key}.")
            continue
        if field.default is not PydanticUndefined:
            default = field.default
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = "(required)"
        kind = _type_name(field.annotation).replace("|", "\\|")
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | `{kind}` | `{default!r}` | {desc} |")
    return rows


def config_reference() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(lines + _rows(RaylmConfig, ""))


def update_doc(path: Path = DOC) -> bool:
    """Rewrite the generated section between the markers; returns True if the file changed."""
    text = path.read_text()
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not (start and end):
        raise ValueError(f"{path}: no {START} ... {END} section to rewrite")
    new = f"{head}{START}\n{config_reference()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    if "--write" in sys.argv:
        where = DOC.relative_to(DOC.parent.parent)
        print(f"{where} updated" if update_doc() else f"{where} already current")
    else:
        print(config_reference())
