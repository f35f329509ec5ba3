"""BootMAE models: the ViT encoder, the decoders and the composed pre-training model."""

from .bootmae import BootMAE, BootMAEOutput, build_model, mask_to_ids
from .decoder import Decoder, PatchPixelHead
from .layers import Attention, Block, CrossAttention, DecoderBlock
from .pos_embed import sincos_2d
from .vit import EncoderOutput, VisionTransformerEncoder

__all__ = [
    "Attention", "Block", "BootMAE", "BootMAEOutput", "CrossAttention", "Decoder", "DecoderBlock",
    "EncoderOutput", "PatchPixelHead", "VisionTransformerEncoder", "build_model",
    "mask_to_ids", "sincos_2d",
]
