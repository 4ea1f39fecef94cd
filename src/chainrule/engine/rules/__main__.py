"""Prints the table of supported primitives, by family, as Markdown.

`python -m chainrule.engine.rules` writes what the README's "Supported
primitives" section holds; `tests/test_registry_coverage.py` checks the README
against it, so the README never claims a primitive the table lacks.
"""

from __future__ import annotations

from collections import defaultdict

from chainrule.engine.rules import PRIMITIVES


def markdown() -> str:
    """The table: one row per rule family, its primitives in alphabetical order;
    those whose outputs carry no gradient are in italics."""
    families: dict[str, list[str]] = defaultdict(list)
    for name in sorted(PRIMITIVES):
        prim = PRIMITIVES[name]
        families[prim.family].append(f"`{name}`" if prim.differentiable else f"*`{name}`*")
    rows = [
        f"| `rules/{family}.py` | {len(names)} | {', '.join(names)} |"
        for family, names in sorted(families.items())
    ]
    header = [
        f"{len(PRIMITIVES)} primitives (*italics*: no gradient flows through their outputs).",
        "",
        "| family | count | primitives |",
        "|---|---|---|",
    ]
    return "\n".join(header + rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
