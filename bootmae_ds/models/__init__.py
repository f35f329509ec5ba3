"""Models: the ViT encoder, BootMAE's decoders and pre-training model, and the classifier that
fine-tuning and probing put on the encoder, and the feature pyramid of dense transfer."""

from .bootmae import BootMAE, BootMAEOutput, build_model, mask_to_ids
from .classifier import ProbeHead, ViTClassifier, first_blocks, resized_encoder
from .decoder import Decoder, PatchPixelHead
from .layers import Attention, Block, CrossAttention, DecoderBlock
from .pos_embed import sincos_2d
from .pyramid import ViTPyramid
from .vit import EncoderOutput, VisionTransformerEncoder

__all__ = [
    "Attention", "Block", "BootMAE", "BootMAEOutput", "CrossAttention", "Decoder", "DecoderBlock",
    "EncoderOutput", "PatchPixelHead", "ProbeHead", "ViTClassifier", "ViTPyramid", "VisionTransformerEncoder",
    "build_model", "first_blocks", "mask_to_ids", "resized_encoder", "sincos_2d",
]
