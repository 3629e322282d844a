"""Models: ViT layers, the patch ViT, the Gaussian encoder and classifier, :class:`GViT` which owns
an encoder, a classifier and g0 sampling (paper 2.2, Appendix A), the GaussianToken / plain VQ
:class:`Tokenizer` with its quantiser, and GaussianVision's :class:`SplatStem` with the CLIP that
wears it (:class:`GaussianCLIP`, needs the extra ``gvit[vl]``)."""

from .encoder import STENCIL, GaussianEncoder, sample_footprints
from .features import fourier_features, log_covariance, splat_features
from .gaussian_clip import GaussianCLIP
from .gvit import GViT
from .layers import (SIZES, Attention, Block, Mlp, PatchEmbed, Transformer, TransformerModel, ViTSize, get_size,
                     init_weights)
from .neighbours import NeighbourLayer, edge_features, nearest_neighbours
from .quantizer import VectorQuantizer, code_statistics
from .refiner import RefinementEncoder
from .splat_stem import PerceiverResampler, SplatStem, splat_set_features, splat_statistics
from .tokenizer import TOKENIZER_KINDS, GaussianTokenizer, GridVQTokenizer, Tokenizer, make_tokenizer
from .vit import GaussianClassifier, PatchViT, TokenViT

__all__ = ["ViTSize", "SIZES", "get_size", "Attention", "Mlp", "Block", "Transformer", "PatchEmbed", "init_weights",
           "TransformerModel", "TokenViT", "PatchViT", "GaussianClassifier", "GaussianEncoder", "sample_footprints",
           "STENCIL", "GViT", "RefinementEncoder", "splat_features", "log_covariance", "fourier_features",
           "NeighbourLayer", "nearest_neighbours", "edge_features", "Tokenizer", "GridVQTokenizer", "GaussianTokenizer",
           "make_tokenizer", "TOKENIZER_KINDS", "VectorQuantizer",
           "code_statistics", "SplatStem", "PerceiverResampler", "splat_set_features", "splat_statistics",
           "GaussianCLIP"]
