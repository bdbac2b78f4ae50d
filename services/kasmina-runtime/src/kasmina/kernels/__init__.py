"""The chunked layer's per-step maths: a PyTorch reference (CPU default, test oracle) and fused
Triton kernels registered as `torch.library` custom ops (CUDA default)."""

from .ops import (
    chunk_blend,
    column_stats,
    fused_mlp_fits,
    interpreting,
    residual_mlp,
    seed_node_fits,
    use_triton,
)

__all__ = ["chunk_blend", "column_stats", "fused_mlp_fits", "interpreting", "residual_mlp",
           "seed_node_fits", "use_triton"]
