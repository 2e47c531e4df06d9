"""Layer rules: the registry and the built-in rules for common layers."""

from torch import nn

from bayescurv.engine.rules.attention import MultiheadAttentionRule
from bayescurv.engine.rules.base import (
    LayerRule,
    get_rule,
    reduce_per_sample,
    register_rule,
    registered_layers,
)
from bayescurv.engine.rules.call import LayerCall
from bayescurv.engine.rules.conv import ConvRule
from bayescurv.engine.rules.conv_transpose import ConvTransposeRule
from bayescurv.engine.rules.generic import GenericRule
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
    RMSNormRule,
)
from bayescurv.engine.rules.recurrent import RecurrentRule

_conv, _bn, _deconv, _rnn = (
    ConvRule(),
    BatchNormRule(),
    ConvTransposeRule(),
    RecurrentRule(),
)
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
    (nn.ConvTranspose1d, _deconv),
    (nn.ConvTranspose2d, _deconv),
    (nn.ConvTranspose3d, _deconv),
    (nn.RMSNorm, RMSNormRule()),
    (nn.MultiheadAttention, MultiheadAttentionRule()),
    (nn.RNN, _rnn),
    (nn.LSTM, _rnn),
    (nn.GRU, _rnn),
):
    register_rule(_cls, _rule)

__all__ = [
    "BatchNormRule",
    "ConvRule",
    "ConvTransposeRule",
    "EmbeddingRule",
    "GenericRule",
    "GroupNormRule",
    "InputStats",
    "KFACApprox",
    "LayerCall",
    "LayerNormRule",
    "LayerRule",
    "LinearRule",
    "MultiheadAttentionRule",
    "RMSNormRule",
    "RecurrentRule",
    "get_rule",
    "input_stats",
    "one_hot_stats",
    "reduce_per_sample",
    "register_rule",
    "registered_layers",
]
