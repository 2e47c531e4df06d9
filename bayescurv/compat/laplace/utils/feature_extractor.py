"""laplace-torch's ``laplace.utils.feature_extractor``."""

from bayescurv.laplace.enums import FeatureReduction
from bayescurv.laplace.laplace_torch.feature_extractor import FeatureExtractor

__all__ = [
    "FeatureExtractor",
    "FeatureReduction",
]
