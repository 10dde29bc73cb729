"""nn.Modules on the ops: attention (mha), MLPs, norms, rotary, blocks, embeddings.

The building blocks of a model are importable from here (``from flash_attn.modules import
MHA``) and from their files (``flash_attn.modules.mha.MHA``, the official flash-attn path).
"""

from flash_attn.modules.block import Block, ParallelBlock
from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import FusedMLP, GatedMlp, Mlp
from flash_attn.modules.norm import LayerNorm, RMSNorm
from flash_attn.modules.rotary import RotaryEmbedding

__all__ = [
    "MHA",
    "Mlp",
    "GatedMlp",
    "FusedMLP",
    "Block",
    "ParallelBlock",
    "LayerNorm",
    "RMSNorm",
    "RotaryEmbedding",
]
