"""The built-in steps' reference page, generated from their classes: `python -m overhaul.stepdocs > docs/steps.md`.

A test compares docs/steps.md with what this prints, so the page cannot drift from the code. It lists the
built-in steps only (the entry points of Overhaul's own distribution): installing a plug-in changes nothing here.
"""

from __future__ import annotations

import inspect

from overhaul.step import Registry, Step


def reference(registry: Registry) -> str:
    lines = ["# Built-in steps", "",
             "Generated from the steps' code by `python -m overhaul.stepdocs > docs/steps.md`; "
             "the parameters are those a runbook stage's `params` takes.", ""]
    for name in registry.builtin_names():  # built-in steps only: an installed plug-in does not change this page
        lines += _step(name, registry.get(name))
    return "\n".join(lines).rstrip() + "\n"


def _step(name: str, step: type[Step]) -> list[str]:
    module_doc = inspect.getdoc(inspect.getmodule(step)) or ""
    lines = [f"## `{name}`", "", inspect.getdoc(step) if step.__doc__ else module_doc.split("\n\n")[0], ""]
    if step.read_only:
        lines += ["Read-only: it only checks, and fails when the check does not hold.", ""]
    elif step.reversible is False:
        lines += [f"Cannot be undone: {step.irreversible or 'it declares no undo'}.", ""]
    fields = step.Params.model_fields
    if fields:
        lines += ["| parameter | type | default | description |", "|---|---|---|---|"]
        for field, info in fields.items():
            kind = str(info.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            default = "required" if info.is_required() else f"`{info.default!r}`"
            lines.append(f"| `{field}` | `{kind}` | {default} | {_cell(info.description or '')} |")
        lines.append("")
    return lines


def _cell(text: str) -> str:
    """`text` as one Markdown table cell: on one line, its `|` escaped."""
    return " ".join(text.split()).replace("|", "\\|")


if __name__ == "__main__":
    print(reference(Registry()), end="")
