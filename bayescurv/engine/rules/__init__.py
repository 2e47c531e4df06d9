"""Layer rules: the registry and the built-in rules for common layers."""

from torch import nn

from bayescurv.engine.rules.base import (
    LayerRule,
    get_rule,
    reduce_per_sample,
    register_rule,
    registered_layers,
)
from bayescurv.engine.rules.conv import ConvRule
from bayescurv.engine.rules.kron_stats import (
    InputStats,
    KFACApprox,
    input_stats,
    one_hot_stats,
)
from bayescurv.engine.rules.linear import LinearRule
from bayescurv.engine.rules.norm import (
    BatchNormRule,
    EmbeddingRule,
    GroupNormRule,
    LayerNormRule,
)

_conv, _bn = ConvRule(), BatchNormRule()
for _cls, _rule in (
    (nn.Linear, LinearRule()),
    (nn.Conv1d, _conv),
    (nn.Conv2d, _conv),
    (nn.Conv3d, _conv),
    (nn.BatchNorm1d, _bn),
    (nn.BatchNorm2d, _bn),
    (nn.BatchNorm3d, _bn),
    (nn.LayerNorm, LayerNormRule()),
    (nn.GroupNorm, GroupNormRule()),
    (nn.Embedding, EmbeddingRule()),
):
    register_rule(_cls, _rule)

__all__ = [
    "BatchNormRule",
    "ConvRule",
    "EmbeddingRule",
    "GroupNormRule",
    "InputStats",
    "KFACApprox",
    "LayerNormRule",
    "LayerRule",
    "LinearRule",
    "get_rule",
    "input_stats",
    "one_hot_stats",
    "reduce_per_sample",
    "register_rule",
    "registered_layers",
]
