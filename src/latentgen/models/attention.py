"""Multi-head softmax attention over token projections: one function for the UNet's transformers
and the text encoders (PyTorch's fused scaled-dot-product kernel does the work)."""

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         causal: bool = False, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, L, heads * d] projections in, [B, L, heads * d] attention out; `causal` masks the future
    (CLIP), `keep` ([B, L_k] bool) the keys that may be attended (BERT's padding mask)."""
    q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
    mask = None if keep is None else keep[:, None, None, :]
    return rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal), "b h l d -> b l (h d)")
