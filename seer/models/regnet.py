"""RegNetY trunks for SEER, built from torchvision's own RegNet building blocks.

The backbone keeps torchvision's `stem` and `trunk_output` submodules (and therefore its
state-dict keys and weight init) and drops the classifier: forward returns globally
average-pooled features (B, C). Owns the design-parameter table of every RegNetY size
(torchvision's, SEER's 256GF / 10B, tiny CPU test models) and the torchvision name mapping
used by the export code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.regnet import BlockParams, RegNet


@dataclass(frozen=True)
class RegNetDesign:
    """RegNet paper design parameters (quantised linear widths) of one RegNetY size."""

    depth: int
    w_0: int
    w_a: float
    w_m: float
    group_width: int
    bottleneck_multiplier: float = 1.0
    se_ratio: float = 0.25
    stem_width: int = 32


# torchvision's numbers are copied from torchvision/models/regnet.py (regnet_y_* builders);
# SEER's from the SEER paper / VISSL configs.
REGNET_DESIGNS: dict[str, RegNetDesign] = {
    "regnety_400mf": RegNetDesign(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8),
    "regnety_800mf": RegNetDesign(depth=14, w_0=56, w_a=38.84, w_m=2.4, group_width=16),
    "regnety_1_6gf": RegNetDesign(depth=27, w_0=48, w_a=20.71, w_m=2.65, group_width=24),
    "regnety_3_2gf": RegNetDesign(depth=21, w_0=80, w_a=42.63, w_m=2.66, group_width=24),
    "regnety_8gf": RegNetDesign(depth=17, w_0=192, w_a=76.82, w_m=2.19, group_width=56),
    "regnety_16gf": RegNetDesign(depth=18, w_0=200, w_a=106.23, w_m=2.48, group_width=112),
    "regnety_32gf": RegNetDesign(depth=20, w_0=232, w_a=115.89, w_m=2.53, group_width=232),
    "regnety_128gf": RegNetDesign(depth=27, w_0=456, w_a=160.83, w_m=2.52, group_width=264),
    # SEER's 64GF (timm regnety_640, the same numbers)
    "regnety_64gf": RegNetDesign(depth=20, w_0=352, w_a=147.48, w_m=2.4, group_width=328),
    # SEER (about 1.3B parameters; output width 10444)
    "regnety_256gf": RegNetDesign(depth=27, w_0=640, w_a=230.83, w_m=2.53, group_width=373),
    # SEER 10B (output width 28280)
    "regnety_10b": RegNetDesign(depth=27, w_0=1744, w_a=620.83, w_m=2.52, group_width=1010),
    # CPU test models: tiny has stages [16, 32] (18k parameters), small [48, 128, 304] (2.1M).
    "regnety_tiny": RegNetDesign(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, stem_width=16),
    "regnety_small": RegNetDesign(depth=12, w_0=48, w_a=32.0, w_m=2.5, group_width=16),
}

# seer name -> torchvision builder name, for sizes torchvision ships (used by export).
TORCHVISION_NAMES: dict[str, str] = {
    name: name.replace("regnety_", "regnet_y_")
    for name in (
        "regnety_400mf",
        "regnety_800mf",
        "regnety_1_6gf",
        "regnety_3_2gf",
        "regnety_8gf",
        "regnety_16gf",
        "regnety_32gf",
        "regnety_128gf",
    )
}


# seer name -> timm model name (timm.models.regnet's RegNetCfg has the same design numbers),
# for the SEER sizes and torchvision's that timm hosts (used by export).
TIMM_NAMES: dict[str, str] = {
    "regnety_400mf": "regnety_004",
    "regnety_1_6gf": "regnety_016",
    "regnety_3_2gf": "regnety_032",
    "regnety_16gf": "regnety_160",
    "regnety_32gf": "regnety_320",
    "regnety_64gf": "regnety_640",
    "regnety_128gf": "regnety_1280",
    "regnety_256gf": "regnety_2560",
}


def block_params_for(design: RegNetDesign) -> BlockParams:
    """torchvision's per-stage settings (depths, widths, group widths) for a design."""
    # BlockParams computes with torch tensors and calls .tolist(); force CPU so building a
    # model under `with torch.device("meta"):` still works.
    with torch.device("cpu"):
        return BlockParams.from_init_params(
            depth=design.depth,
            w_0=design.w_0,
            w_a=design.w_a,
            w_m=design.w_m,
            group_width=design.group_width,
            bottleneck_multiplier=design.bottleneck_multiplier,
            se_ratio=design.se_ratio,
        )


class RegNetBackbone(nn.Module):
    """RegNetY trunk: torchvision's `stem` + `trunk_output`, then global average pooling.

    State-dict keys equal torchvision's RegNet minus `fc.*`, so the weights load into
    `torchvision.models.regnet_y_*()` whose `fc` is replaced by nn.Identity.
    """

    # The input/weight layout this backbone trains fastest in, per device type (`train.memory_format=auto`).
    # cuda: measured on one H200 (torch 2.11, bf16, SwAV RegNetY-16GF, SEER crops, AC): 248 img/s in
    # channels_last against 216 contiguous (+15%); other sizes are assumed to follow (grouped
    # convolutions, which older cuDNN ran slower in NHWC, are what every RegNetY block has).
    # cpu: measured here (docs/benchmarks.md, "Memory format"): forward + backward 9-12% faster (fp32, 112 px).
    preferred_memory_format = {"cuda": "channels_last", "cpu": "channels_last"}

    def __init__(
        self,
        design: RegNetDesign,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        activation: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        params = block_params_for(design)
        # Build torchvision's model (num_classes=1 keeps the discarded fc tiny) so blocks and
        # ResNet-style weight init are exactly torchvision's; keep only the trunk.
        reference = RegNet(
            params,
            num_classes=1,
            stem_width=design.stem_width,
            norm_layer=norm_layer,
            activation=activation,
        )
        self.stem = reference.stem
        self.trunk_output = reference.trunk_output
        self.design = design
        self.stage_widths: list[int] = list(params.widths)
        self.stage_depths: list[int] = list(params.depths)
        self.num_features: int = params.widths[-1]

    @torch.no_grad()
    def init_weights(self) -> None:
        """torchvision's ResNet-style init, for materialising a model built on the meta
        device (the constructor already applies it through torchvision's RegNet)."""
        for name, module in self.named_modules():
            self.init_module(name, module)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module) -> None:
        """Initialise ``module``'s own tensors (not its children's); ``name`` is its name in
        this backbone. Per module, so that ``seer.engine.meta_init`` can initialise one full
        tensor at a time."""
        if isinstance(module, nn.Conv2d):
            # PyTorch's default init first: torchvision leaves the biases of the SE
            # convolutions at it and only redraws the weights.
            module.reset_parameters()
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
        elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            module.reset_parameters()  # weight 1, bias 0 (and BN running stats reset)

    def stages(self) -> list[nn.Module]:
        """The AnyStage modules in order (trunk_output.block1, block2, ...)."""
        return list(self.trunk_output.children())

    def blocks(self) -> list[nn.Module]:
        """Residual bottleneck blocks in order: the unit wrapped by FSDP / checkpointing."""
        return [block for stage in self.stages() for block in stage.children()]

    def forward_feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Last stage's feature map (B, C, H/32, W/32)."""
        return self.trunk_output(self.stem(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RegNetBackbone expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        feature_map = self.forward_feature_map(images)
        return torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1)


def build_regnet(
    name: str,
    norm_layer: Optional[Callable[..., nn.Module]] = None,
    activation: Optional[Callable[..., nn.Module]] = None,
) -> RegNetBackbone:
    """RegNetBackbone for a name in REGNET_DESIGNS."""
    if name not in REGNET_DESIGNS:
        raise ValueError(f"unknown RegNet {name!r}; known: {sorted(REGNET_DESIGNS)}")
    return RegNetBackbone(REGNET_DESIGNS[name], norm_layer=norm_layer, activation=activation)
