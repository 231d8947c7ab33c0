"""Vision Transformer backbones for MoCo v3, with timm-compatible state-dict keys.

Keys equal those of timm's `VisionTransformer(num_classes=0)` (`cls_token`, `pos_embed`,
`patch_embed.proj`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm` or
`fc_norm`), so weights load into timm for evaluation. MoCo v3 specifics: fixed 2-D sin-cos
position embedding, optional frozen random patch projection (`stop_grad_conv1`), xavier init
with q, k, v initialised as separate blocks. Owns the ViT size table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

GLOBAL_POOLS = ("token", "avg")
POS_EMBED_TYPES = ("sincos", "learned")


@dataclass(frozen=True)
class ViTDesign:
    """Size of one ViT: width, depth, heads and patch size."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int


# num_heads follow timm (ViT-S has 6 heads there; MoCo v3's own ViT-S used 12: pass
# num_heads=12 as an override for that, the parameter count is the same).
VIT_DESIGNS: dict[str, ViTDesign] = {
    "vit_micro_patch16": ViTDesign(embed_dim=64, depth=2, num_heads=2, patch_size=16),
    "vit_tiny_patch16": ViTDesign(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "vit_small_patch16": ViTDesign(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "vit_base_patch16": ViTDesign(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    "vit_large_patch16": ViTDesign(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
    "vit_huge_patch14": ViTDesign(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
    "vit_small_patch7": ViTDesign(embed_dim=384, depth=12, num_heads=6, patch_size=7),
    "vit_base_patch7": ViTDesign(embed_dim=768, depth=12, num_heads=12, patch_size=7),
}


def sincos_position_embedding(grid_size: int, embed_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos table, shape (1, 1 + grid_size**2, embed_dim), float64.

    Row 0 (class token) is zero. For patch token m (row-major, row = m // grid, col = m % grid)
    the channels are [sin(row * w), cos(row * w), sin(col * w), cos(col * w)] with
    w_d = temperature ** (-d / (embed_dim / 4)), d = 0 .. embed_dim/4 - 1.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    with torch.device("cpu"):  # real numbers even when the model is built on the meta device
        omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
        token_index = torch.arange(grid_size * grid_size, dtype=torch.int64)
        rows = (token_index // grid_size).to(torch.float64)
        cols = (token_index % grid_size).to(torch.float64)
        row_angles = rows[:, None] * omega[None, :]
        col_angles = cols[:, None] * omega[None, :]
        table = torch.cat(
            [row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=1
        )
        return torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)[None]


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (B, N, D) through a strided convolution `proj`."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"ViT built for {self.img_size}x{self.img_size} images got input of shape {tuple(images.shape)}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens)))
        return tokens + self.drop_path(self.mlp(self.norm2(tokens)))


class BlockList(nn.ModuleList):
    """The transformer blocks. Stored as `blocks` so keys are timm's `blocks.{i}.*`; calling
    it, `vit.blocks()`, returns them as a list, the same API as RegNetBackbone.blocks()."""

    def __call__(self) -> list[nn.Module]:  # type: ignore[override]
        return list(self)


class VisionTransformer(nn.Module):
    """ViT trunk returning (B, D) features: class token or patch-token average."""

    # one strided convolution, then tokens: the image layout does not matter (`train.memory_format=auto`)
    preferred_memory_format = {"cuda": "contiguous", "cpu": "contiguous"}

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int = 16,
        img_size: int = 224,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        global_pool: str = "token",
        stop_grad_conv1: bool = False,
        pos_embed: str = "sincos",
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_TYPES}, got {pos_embed!r}")
        if pos_embed == "sincos" and embed_dim % 4 != 0:
            raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.global_pool = global_pool
        self.stop_grad_conv1 = stop_grad_conv1
        self.pos_embed_type = pos_embed

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A Parameter (not a buffer) so the key matches timm; frozen for sin-cos.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim), requires_grad=pos_embed == "learned"
        )
        drop_rates = [drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]
        self.blocks = BlockList(Block(embed_dim, num_heads, mlp_ratio, rate, norm_eps) for rate in drop_rates)
        # timm: with average pooling the final norm is applied after pooling (fc_norm).
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()

        if stop_grad_conv1:
            self.patch_embed.proj.weight.requires_grad_(False)
            self.patch_embed.proj.bias.requires_grad_(False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """MoCo v3 init; also usable to materialise a model built on the meta device."""
        for name, module in self.named_modules():
            self.init_module(name, module)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module) -> None:
        """Initialise ``module``'s own tensors (not its children's); ``name`` is its name in
        this ViT ("" for the ViT itself: cls_token, pos_embed). Per module, so that
        ``seer.engine.meta_init`` can initialise one full tensor at a time."""
        if name == "":
            nn.init.normal_(module.cls_token, std=1e-6)
            if self.pos_embed_type == "sincos":
                table = sincos_position_embedding(self.patch_embed.grid_size, self.embed_dim)
                module.pos_embed.copy_(table.to(dtype=module.pos_embed.dtype))
            else:
                nn.init.trunc_normal_(module.pos_embed, std=0.02)
        elif name == "patch_embed.proj":
            fan_sum = module.in_channels * module.kernel_size[0] * module.kernel_size[1] + module.out_channels
            bound = math.sqrt(6.0 / float(fan_sum))
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if name.endswith("attn.qkv"):
                # q, k and v are three (dim x dim) blocks: xavier bound of one block.
                bound = math.sqrt(6.0 / float(module.weight.shape[0] // 3 + module.weight.shape[1]))
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All output tokens (B, 1 + N, D) after the blocks and `norm`."""
        tokens = self.patch_embed(images)
        cls_tokens = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls_tokens, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(images)
        pooled = tokens[:, 1:].mean(dim=1) if self.global_pool == "avg" else tokens[:, 0]
        return self.fc_norm(pooled)


def build_vit(name: str, **overrides) -> VisionTransformer:
    """VisionTransformer for a name in VIT_DESIGNS; overrides go to the constructor."""
    if name not in VIT_DESIGNS:
        raise ValueError(f"unknown ViT {name!r}; known: {sorted(VIT_DESIGNS)}")
    design = VIT_DESIGNS[name]
    arguments = dict(
        embed_dim=design.embed_dim, depth=design.depth, num_heads=design.num_heads, patch_size=design.patch_size
    )
    arguments.update(overrides)
    return VisionTransformer(**arguments)
