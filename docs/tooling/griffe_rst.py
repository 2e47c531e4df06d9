r"""Griffe extension: the docstrings' reStructuredText roles and math as Markdown.

The docstrings are Google style with a few reStructuredText constructs that read
well in a terminal (``help(...)``) and that mkdocstrings does not render:

- ``:class:`~bayescurv.engine.BatchGrad```, ``:func:`backprop``` and the other
  Python roles become cross-references ``[`BatchGrad`][bayescurv.engine...]`` when
  the name resolves (from the documented object's scope, as Python would) to an
  object the reference renders, and plain code otherwise (a private helper);
- a ``# NOTE [title]`` comment block (a design note kept in a module docstring)
  becomes a note admonition;
- an ``Example:`` block of doctests is read as Google's ``Examples:`` section (code,
  not Markdown);
- an exported class made at run time (by a factory) takes its ``__doc__``;
- ``:math:`x``` becomes inline math ``\\(x\\)`` and a ``.. math::`` block a display
  ``\\[ ... \\]``, also when the formula follows ``.. math::`` on its line (rendered
  by MathJax through ``pymdownx.arithmatex``).

Usage: ``extensions: [docs/tooling/griffe_rst.py]`` in the mkdocstrings options of
``mkdocs.yml``; :data:`RENDERED` names the modules the reference pages render
(``MODULES`` of ``docs/build.py``).
"""

from __future__ import annotations

import importlib.util
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import griffe


def _build_script() -> Any:
    """``docs/build.py`` (a script beside this folder) as a module."""
    path = Path(__file__).resolve().parents[1] / "build.py"
    spec = importlib.util.spec_from_file_location("bayescurv_docs_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RENDERED: tuple[str, ...] = _build_script().MODULES
"""Modules with a reference page; a role links only to what these render."""

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`(~?)([^`<>]+)`")
MATH_ROLE = re.compile(r":math:`([^`]+)`")
MATH_BLOCK = re.compile(
    r"^([ \t]*)\.\. math::[ \t]*\n((?:\1[ \t]+\S.*\n|[ \t]*\n)+)", re.M
)
EXAMPLE = re.compile(r"^([ \t]*)Example:[ \t]*$", re.M)
MATH_LINE = re.compile(r"^([ \t]*)\.\. math::[ \t]+(\S.*\n(?:\1[ \t]+\S.*\n)*)", re.M)
NOTE = re.compile(r"^([ \t]*)# NOTE \[([^\]]+)\]\n((?:\1#(?: .*)?\n)*)", re.M)


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    """``obj`` and its own members, recursively (aliases are skipped)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _public_members(obj: griffe.Object | griffe.Alias) -> Iterator[str]:
    """Canonical paths of ``obj``'s public members, recursively."""
    for name, member in obj.members.items():
        if name.startswith("_") or (member.is_alias and not member.resolved):
            continue
        try:
            target = member.final_target if member.is_alias else member
        except griffe.AliasResolutionError:
            continue
        if member.is_module and not target.path.startswith(obj.path + "."):
            continue  # an imported foreign module
        if target.has_docstring:  # mkdocstrings skips undocumented members
            yield target.path
        if target.is_class:
            yield from _public_members(target)


def rendered_paths(collection: griffe.ModulesCollection) -> set[str]:
    """Canonical paths of every object the reference pages render."""
    paths = set()
    for name in RENDERED:
        module = collection[name]
        paths.add(module.path)
        exported = module.exports
        for member_name, member in module.members.items():
            if exported is not None and member_name not in exported:
                continue
            if exported is None and member_name.startswith("_"):
                continue
            try:
                target = member.final_target if member.is_alias else member
            except griffe.AliasResolutionError:
                continue
            paths.add(target.path)
            if target.is_class:
                paths.update(_public_members(target))
    return paths


def _lookup(collection: griffe.ModulesCollection, path: str) -> str | None:
    """The canonical path of the object at ``path`` (``None`` if unknown)."""
    try:
        obj = collection[path]
        return obj.final_target.path if obj.is_alias else obj.path
    except (KeyError, griffe.AliasResolutionError, ValueError):
        return None


def resolve(
    name: str, scope: griffe.Object, collection: griffe.ModulesCollection
) -> str | None:
    """The canonical path ``name`` refers to from ``scope``'s docstring."""
    head, _, rest = name.partition(".")
    candidates = [name]
    try:
        candidates.append(scope.resolve(head) + (f".{rest}" if rest else ""))
    except (griffe.NameResolutionError, AttributeError):
        pass
    owner = scope
    while owner is not None:  # relative to each enclosing class and module
        candidates.append(f"{owner.path}.{name}")
        owner = owner.parent
    for candidate in candidates:
        path = _lookup(collection, candidate)
        if path is not None:
            return path
    return None


def convert(
    text: str,
    scope: griffe.Object,
    collection: griffe.ModulesCollection,
    rendered: set[str],
) -> str:
    """``text`` with its roles and math blocks in Markdown."""

    def role(match: re.Match) -> str:
        short, name = match[1] == "~", match[2].strip()
        shown = name.rsplit(".", 1)[-1] if short else name
        path = resolve(name, scope, collection)
        return f"[`{shown}`][{path}]" if path in rendered else f"`{shown}`"

    def block(match: re.Match) -> str:
        indent, body = match[1], textwrap.dedent(match[2]).strip("\n")
        body = textwrap.indent(body, indent)
        return f"{indent}\\[\n{body}\n{indent}\\]\n\n"

    def note(match: re.Match) -> str:
        indent = match[1]
        lines = [line[len(indent) + 1 :].strip() for line in match[3].splitlines()]
        body = textwrap.indent(textwrap.fill(" ".join(lines)), indent + "    ")
        return f'{indent}!!! note "Design note: {match[2]}"\n{body}\n'

    text = text if text.endswith("\n") else text + "\n"

    def line(match: re.Match) -> str:
        indent = match[1]
        body = " ".join(part.strip() for part in match[2].splitlines())
        return f"{indent}\\[ {body} \\]\n"

    text = MATH_LINE.sub(line, MATH_BLOCK.sub(block, text))
    text = NOTE.sub(note, text)
    text = EXAMPLE.sub(r"\1Examples:", text)
    text = MATH_ROLE.sub(lambda m: f"\\({m[1]}\\)", text)
    return ROLE.sub(role, text).rstrip("\n")


def unshadow(collection: griffe.ModulesCollection) -> None:
    """Let an exported function win over the private submodule of the same name.

    ``bayescurv.engine.backprop`` is both a file and the function ``backprop`` that
    ``engine/__init__.py`` imports from it; griffe keeps the submodule as the member,
    Python keeps the function. The member becomes an alias of the function (the
    submodule's objects keep their paths).
    """
    for name in RENDERED:
        module = collection[name]
        for exported in module.exports or ():
            member = module.members.get(exported)
            if member is None or member.is_alias or not member.is_module:
                continue
            inner = member.members.get(exported)
            if inner is not None and not inner.is_module:
                alias = griffe.Alias(exported, target=inner, parent=module)
                module.set_member(exported, alias)


def runtime_class_docstrings(collection: griffe.ModulesCollection) -> None:
    """Give exported classes made at run time their docstring.

    A class built by a factory (``KronLLLaplace = _flavor(...)``) is an attribute
    without a docstring to griffe, which reads the source; the class itself has one
    (its ``__doc__``), so the attribute takes it and is rendered.
    """
    for name in RENDERED:
        module = collection[name]
        for exported in module.exports or ():
            member = module.members.get(exported)
            try:
                target = member.final_target if member.is_alias else member
            except (AttributeError, griffe.AliasResolutionError):
                continue
            if not target.is_attribute or target.has_docstring:
                continue
            owner = importlib.import_module(target.parent.path)
            runtime = getattr(owner, target.name, None)
            if isinstance(runtime, type) and runtime.__doc__:
                target.docstring = griffe.Docstring(runtime.__doc__, parent=target)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded package once it is complete."""

    def on_package(self, *, pkg: griffe.Module, loader: Any, **kwargs: Any) -> None:
        """Convert the docstrings of every object of ``pkg``."""
        collection = loader.modules_collection
        objects = list(_walk(pkg))  # before unshadow hides the submodules
        unshadow(collection)
        runtime_class_docstrings(collection)
        rendered = rendered_paths(collection)
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = convert(
                    obj.docstring.value, obj, collection, rendered
                )
