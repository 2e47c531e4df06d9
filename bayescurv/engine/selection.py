"""Which parameters the engine computes quantities for (the ``params=`` argument).

Every entry point of the engine (:func:`~bayescurv.engine.backprop`,
:func:`~bayescurv.engine.ggn_matrix`, the products and operators) takes
``params=None``: an iterable of parameter names (as in ``model.named_parameters()``)
or of the model's parameter tensors, mixed as convenient. The default selects every
parameter with ``requires_grad``. Results are keyed by the selected parameters' names
in ``named_parameters()`` order, whatever order they were given in.

# NOTE [Tied parameters have one name]
# A tensor registered under several names (an embedding tied to the output projection)
# is one parameter. ``named_parameters()`` lists it once, under the name of its first
# registration, and that is its key in every result. Its other names are accepted in
# ``params=`` and map to the same key; its quantities sum the contributions of every
# module that uses it.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

ParamSelection = Iterable[str | Tensor] | None
"""``params=``: names and/or parameter tensors of the model, or ``None`` for all."""


def select_parameters(
    model: nn.Module, params: ParamSelection = None
) -> dict[str, nn.Parameter]:
    """The selected parameters by name, in ``named_parameters()`` order.

    Args:
        model: The model.
        params: Names (any of a tied parameter's names) and/or parameter tensors of
            ``model``; ``None`` selects every parameter with ``requires_grad``.

    Returns:
        ``name -> parameter`` with each tied parameter once, under its first name.

    Raises:
        TypeError: If ``params`` is a single name or tensor, or holds other objects.
        ValueError: For an unknown name, a tensor that is not a parameter of
            ``model``, a selected parameter with ``requires_grad=False``, or an empty
            selection. The message names the offending entry.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> list(select_parameters(model, [model[1].bias, "0.weight"]))
        ['0.weight', '1.bias']
    """
    first_names = {id(p): name for name, p in model.named_parameters()}
    if params is None:
        selected = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not selected:
            raise ValueError(f"{type(model).__name__} has no trainable parameters.")
        return selected
    if isinstance(params, (str, Tensor)):
        raise TypeError(
            f"params must be an iterable of parameter names or tensors, got a single "
            f"{type(params).__name__}; wrap it in a list: params=[...]."
        )
    aliases = dict(model.named_parameters(remove_duplicate=False))
    wanted: set[int] = set()
    for entry in params:
        p = _resolve(model, entry, aliases, first_names)
        if not p.requires_grad:
            raise ValueError(
                f"params selects '{first_names[id(p)]}', which has "
                "requires_grad=False: the engine computes quantities of trainable "
                "parameters only. Call requires_grad_(True) on it or leave it out."
            )
        wanted.add(id(p))
    if not wanted:
        raise ValueError("params selects no parameter (an empty iterable was given).")
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


def _resolve(
    model: nn.Module,
    entry: object,
    aliases: dict[str, nn.Parameter],
    first_names: dict[int, str],
) -> nn.Parameter:
    """The parameter an entry of ``params`` stands for (see the raises above)."""
    if isinstance(entry, str):
        if entry not in aliases:
            known = list(first_names.values())
            shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
            raise ValueError(
                f"params names '{entry}', which is not a parameter of "
                f"{type(model).__name__}; its parameters are: {shown}."
            )
        return aliases[entry]
    if isinstance(entry, Tensor):
        if id(entry) not in first_names:
            raise ValueError(
                f"params holds a tensor of shape {tuple(entry.shape)} that is not a "
                f"parameter of {type(model).__name__} (a copy or a detached view? "
                "pass the model's own parameter objects or their names)."
            )
        return aliases[first_names[id(entry)]]
    raise TypeError(
        "params entries must be parameter names (str) or parameter tensors, got "
        f"{type(entry).__name__} (for model.named_parameters(), pass the names: "
        "[name for name, _ in model.named_parameters()])."
    )
