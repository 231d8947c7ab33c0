"""State-dict key layouts of exported backbones: seer's own, torchvision's and timm's.

seer's RegNetY keys are torchvision's (``stem.0``, ``trunk_output.block2.block2-0.f.a.0``...);
timm's RegNet names the same tensors ``stem.conv``, ``s2.b1.conv1.conv``... seer's ViT keys
are timm's (``blocks.0.attn.qkv``...); torchvision's VisionTransformer names them
``encoder.layers.encoder_layer_0.self_attention.in_proj_weight``... (class-token pooling only).
Each layout is a pair of pure functions ``seer key -> layout key`` and back, plus the name of
the classifier a fine-tuning model expects (``fc`` / ``head.fc`` / ``head`` / ``heads.head``).
"""

from __future__ import annotations

import re

FORMATS = ("seer", "torchvision", "timm")

# (seer, other) name templates: "{i}", "{j}", "{k}" stand for numbers, "^"/"$" anchor.
_REGNET_TIMM_PAIRS = (
    ("^stem.0.", "^stem.conv."),
    ("^stem.1.", "^stem.bn."),
    ("^trunk_output.block{i}.block{k}-{j}.", "^s{i}.b{j}."),  # k repeats i; blocks 0-based -> 1-based
    (".proj.0.", ".downsample.conv."),
    (".proj.1.", ".downsample.bn."),
    (".f.a.0.", ".conv1.conv."),
    (".f.a.1.", ".conv1.bn."),
    (".f.b.0.", ".conv2.conv."),
    (".f.b.1.", ".conv2.bn."),
    (".f.se.", ".se."),
    (".f.c.0.", ".conv3.conv."),
    (".f.c.1.", ".conv3.bn."),
)
_VIT_TORCHVISION_PAIRS = (
    ("^cls_token$", "^class_token$"),
    ("^pos_embed$", "^encoder.pos_embedding$"),
    ("^patch_embed.proj.", "^conv_proj."),
    ("^norm.", "^encoder.ln."),
    ("^blocks.{i}.norm1.", "^encoder.layers.encoder_layer_{i}.ln_1."),
    ("^blocks.{i}.norm2.", "^encoder.layers.encoder_layer_{i}.ln_2."),
    ("^blocks.{i}.attn.qkv.weight$", "^encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight$"),
    ("^blocks.{i}.attn.qkv.bias$", "^encoder.layers.encoder_layer_{i}.self_attention.in_proj_bias$"),
    ("^blocks.{i}.attn.proj.", "^encoder.layers.encoder_layer_{i}.self_attention.out_proj."),
    ("^blocks.{i}.mlp.fc1.", "^encoder.layers.encoder_layer_{i}.mlp.0."),
    ("^blocks.{i}.mlp.fc2.", "^encoder.layers.encoder_layer_{i}.mlp.3."),
)


def _pattern(template: str) -> str:
    return re.escape(template).replace(r"\^", "^").replace(r"\$", "$") \
        .replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)").replace(r"\{k\}", r"(?P<k>\d+)")


def _rename(pairs, key: str, forward: bool, block_offset: int = 0) -> str:
    """Apply every (seer, other) template pair to ``key``, seer -> other when ``forward``."""
    for pair in pairs:
        source, target = pair if forward else pair[::-1]
        match = re.search(_pattern(source), key)
        if not match:
            continue
        numbers = match.groupdict()
        numbers.setdefault("k", numbers.get("i", ""))
        if "j" in numbers:  # torchvision counts blocks in a stage from 0, timm from 1
            numbers["j"] = str(int(numbers["j"]) + (block_offset if forward else -block_offset))
        replacement = target.strip("^$")
        for name, value in numbers.items():
            replacement = replacement.replace("{" + name + "}", value)
        key = key[:match.start()] + replacement + key[match.end():]
    return key


def family(architecture: str) -> str:
    if architecture.startswith("regnet"):
        return "regnet"
    if architecture.startswith("vit"):
        return "vit"
    raise ValueError(f"no export layout for architecture {architecture!r}")


def classifier_prefix(architecture: str, fmt: str) -> str:
    """Where the fine-tuning model of ``fmt`` keeps its classifier."""
    return {
        ("regnet", "seer"): "fc", ("regnet", "torchvision"): "fc", ("regnet", "timm"): "head.fc",
        ("vit", "seer"): "head", ("vit", "timm"): "head", ("vit", "torchvision"): "heads.head",
    }[(family(architecture), fmt)]


def check_format(architecture: str, fmt: str, model_kwargs: dict | None = None) -> None:
    """Raise ValueError when ``fmt`` cannot hold this backbone."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if family(architecture) == "vit" and fmt == "torchvision":
        kwargs = model_kwargs or {}
        if kwargs.get("global_pool", "token") != "token":
            raise ValueError("torchvision's VisionTransformer pools the class token only; export this "
                             "average-pooled ViT with --format timm")


def _layout(architecture: str, fmt: str) -> tuple[tuple, int]:
    """The template pairs (and block-number offset) between seer's keys and ``fmt``'s."""
    kind = family(architecture)
    if fmt == "timm" and kind == "regnet":
        return _REGNET_TIMM_PAIRS, 1
    if fmt == "torchvision" and kind == "vit":
        return _VIT_TORCHVISION_PAIRS, 0
    return (), 0  # seer's own keys are the other library's


def to_format(architecture: str, fmt: str, key: str) -> str:
    """seer key -> key of ``fmt``."""
    pairs, offset = _layout(architecture, fmt)
    return _rename(pairs, key, True, block_offset=offset)


def from_format(architecture: str, fmt: str, key: str) -> str:
    """Key of ``fmt`` -> seer key (the inverse of :func:`to_format`)."""
    pairs, offset = _layout(architecture, fmt)
    return _rename(pairs, key, False, block_offset=offset)
