"""Models the command line trains (written here: torchvision is not a dependency).

Every builder in :data:`MODELS` takes the data's ``input_shape`` (C, H, W) or (features,)
and ``num_classes`` first, then its own keyword arguments; the config's ``model`` block
names a builder and gives those keywords (``{name: mlp, sizes: [64, 300, 100, 10]}``).

| name | model |
|---|---|
| ``mlp`` | fully connected ReLU network, ``sizes`` given |
| ``lenet300`` | LeNet-300-100 (LeCun et al. 1998) |
| ``lenet5`` | LeNet-5: two 5x5 convolutions, three fully connected layers |
| ``cnn`` | :class:`SmallCNN`, two 3x3 convolutions for 8x8 inputs (digits) |
| ``resnet20`` / ``resnet32`` / ``resnet56`` | CIFAR ResNets (He et al. 2016), 1x1-conv shortcuts |
| ``resnet18`` | :class:`ResNet18`, the ImageNet ResNet-18 (``width`` 64) |
| ``resnet50`` | :class:`ResNet50`, bottleneck ResNet-50 with a CIFAR (3x3) or ImageNet (7x7 + pool) stem |
| ``wrn22_2`` / ``wrn28_2`` | Wide ResNets (Zagoruyko & Komodakis 2016), pre-activation |
| ``transformer`` | :class:`TransformerEncoder`: patches as tokens, separate q/k/v projections |
| ``gpt`` | :class:`GPT`, a small decoder-only language model (token windows, e.g. ``pydoc_topics``) |
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..core.nets import MLP

__all__ = [
    "MLP", "SmallCNN", "LeNet5", "ResNet", "ResNet18", "ResNet50", "WideResNet", "TransformerEncoder", "Attention", "GPT",
    "MODELS", "create_model", "list_models",
]


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (1→16→32 channels), a 2x2 max-pool, and two linear layers: for 8x8 inputs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 8, width: int = 16,
                 hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * (input_size // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class LeNet5(nn.Module):
    """LeNet-5: conv 5x5 (6) → pool → conv 5x5 (16) → pool → 120 → 84 → classes.

    28x28 inputs are padded by 2 as in the original 32x32 design; any size ≥ 12 works.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        pad = 2 if input_size <= 28 else 0
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = ((input_size + 2 * pad - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet-5 needs inputs of at least 12x12, got {input_size}x{input_size}")
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet of depth 6n + 2: three stages of n basic blocks at 16, 32, 64 channels."""

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


class _WideBlock(nn.Module):
    """Pre-activation: BN → ReLU → conv 3x3 → BN → ReLU → conv 3x3, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-d-k: depth 6n + 4, three stages of n pre-activation blocks at 16k, 32k, 64k channels."""

    def __init__(self, depth: int = 28, widen: int = 2, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has depth 6n + 4 (16, 22, 28, 40), got {depth}")
        n = (depth - 4) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks, cin = [], 16
        for stage, cout in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for i in range(n):
                blocks.append(_WideBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(x.mean((2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``out`` projections.

    Rows of q/k/v (and columns of out) come in ``heads`` stacked groups of ``dim / heads``:
    what ``balance_out_groups`` / ``balance_in_groups`` balance.
    """

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the model width {dim} must be a multiple of the number of heads {heads}")
        self.heads, self.causal = heads, causal   # causal: a token attends to itself and earlier ones only
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                                       is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def matmul_flops(self, tokens: int, dim: int) -> int:
        """FLOPs per sample of the two attention products, Q·Kᵀ and A·V: 2 · 2 · T² · D."""
        return 4 * tokens * tokens * dim


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TransformerEncoder(nn.Module):
    """A small pre-norm transformer encoder for images: ``patch`` x ``patch`` patches are tokens.

    Inputs of shape (C, H, W) give (H/patch)·(W/patch) tokens; flat inputs of F features give
    one token per ``patch`` features. The token projection (``embed``), position embedding and
    norms stay dense under the default filter; q/k/v/out and the MLPs are sparsified.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, dim: int = 64,
                 depth: int = 2, heads: int = 4, patch: int = 2, mlp_ratio: int = 2):
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) == 3:
            c, h, w = shape
            if h % patch or w % patch:
                raise ValueError(f"patch {patch} must divide the image size {h}x{w}")
            tokens, token_size = (h // patch) * (w // patch), c * patch * patch
        else:
            (features,) = shape
            if features % patch:
                raise ValueError(f"patch {patch} must divide the {features} input features")
            tokens, token_size = features // patch, patch
        self.input_shape, self.patch = shape, patch
        self.embed = nn.Linear(token_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.layers = nn.ModuleList(_EncoderLayer(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, x: Tensor) -> Tensor:
        if len(self.input_shape) == 3:
            p = self.patch
            x = nn.functional.unfold(x, kernel_size=p, stride=p)  # (B, C·p·p, tokens)
            return x.transpose(1, 2)
        return x.reshape(x.shape[0], -1, self.patch)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(self.tokens(x)) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))


def _features(input_shape: Sequence[int]) -> int:
    return math.prod(input_shape)


def _image(input_shape: Sequence[int], what: str) -> tuple[int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{what} needs image inputs (C, H, W); this data has flat inputs of shape {tuple(input_shape)}")
    return input_shape[0], input_shape[1]


def _mlp(input_shape, num_classes, sizes: Sequence[int] = (64, 300, 100, 10)) -> nn.Module:
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
    if sizes[0] != _features(input_shape):
        raise ValueError(f"sizes[0] is {sizes[0]}, but the data has {_features(input_shape)} input features "
                         f"(shape {tuple(input_shape)}): set sizes[0] to {_features(input_shape)}")
    if sizes[-1] != num_classes:
        raise ValueError(f"sizes[-1] is {sizes[-1]}, but the data has {num_classes} classes: "
                         f"set sizes[-1] to {num_classes}")
    return MLP(sizes)


def _lenet300(input_shape, num_classes, hidden: Sequence[int] = (300, 100)) -> nn.Module:
    return MLP([_features(input_shape), *hidden, num_classes])


def _lenet5(input_shape, num_classes) -> nn.Module:
    c, size = _image(input_shape, "lenet5")
    return LeNet5(c, num_classes, size)


def _cnn(input_shape, num_classes, width: int = 16, hidden: int = 64) -> nn.Module:
    c, size = _image(input_shape, "cnn")
    return SmallCNN(c, num_classes, size, width, hidden)


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(input_shape, num_classes, width: int = 16) -> nn.Module:
        return ResNet(depth, _image(input_shape, f"resnet{depth}")[0], num_classes, width)

    build.__doc__ = f"CIFAR ResNet-{depth}."
    return build


def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    def build(input_shape, num_classes) -> nn.Module:
        return WideResNet(depth, widen, _image(input_shape, f"wrn{depth}_{widen}")[0], num_classes)

    build.__doc__ = f"WRN-{depth}-{widen}."
    return build


def _transformer(input_shape, num_classes, dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 2,
                 mlp_ratio: int = 2) -> nn.Module:
    return TransformerEncoder(input_shape, num_classes, dim, depth, heads, patch, mlp_ratio)


class GPT(nn.Module):
    """A small decoder-only transformer (GPT-2's layout: learned positions, pre-norm blocks of causal
    attention and a GELU MLP, a final norm, ``lm_head``) over ``vocab`` tokens and ``context`` positions.

    Input: (B, T) token ids, T ≤ context; output: logits (B, vocab, T), the vocabulary second, as
    ``cross_entropy(logits, next_tokens)`` reads a sequence of targets. The token and position
    embeddings, norms and ``lm_head`` stay dense under the default filter; q/k/v/out and the MLPs are
    sparsified, q/k/v rows and out columns in ``heads`` groups (what ``balance_*_groups`` balance).
    """

    def __init__(self, context: int, vocab: int, dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, context, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.layers = nn.ModuleList(_EncoderLayer(dim, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x.long()) + self.pos_embed[:, :x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x)).transpose(1, 2)


def _gpt(input_shape, num_classes, dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 4) -> nn.Module:
    if len(input_shape) != 1:
        raise ValueError(f"gpt reads token windows of shape (context,), not {tuple(input_shape)}")
    return GPT(input_shape[0], num_classes, dim, depth, heads, mlp_ratio)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp, "lenet300": _lenet300, "lenet5": _lenet5, "cnn": _cnn,
    "resnet20": _resnet(20), "resnet32": _resnet(32), "resnet56": _resnet(56),
    "wrn22_2": _wrn(22, 2), "wrn28_2": _wrn(28, 2), "transformer": _transformer, "gpt": _gpt,
}


class ResNet18(nn.Module):
    """ImageNet ResNet-18 (He et al. 2016; torchvision's layout): 7x7 stride-2 conv, max-pool,
    four stages of two basic blocks at ``width`` · (1, 2, 4, 8) channels, global average pool.
    The fasterai lottery-ticket blog trains it on Imagenette."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], width
        for stage in range(4):
            cout = width * 2 ** stage
            for i in range(2):
                blocks.append(_BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(self.blocks(x).mean((2, 3)))


def _resnet18(input_shape, num_classes, width: int = 64) -> nn.Module:
    """ImageNet ResNet-18 (``width`` 64 is the original)."""
    return ResNet18(_image(input_shape, "resnet18")[0], num_classes, width)


MODELS["resnet18"] = _resnet18


class _Bottleneck(nn.Module):
    """1x1 (reduce to ``mid``) → 3x3 (``stride``) → 1x1 (expand to 4 · mid), each with BN; a 1x1
    conv + BN shortcut where the shape changes."""

    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = self.expansion * mid
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


RESNET50_STEMS = ("cifar", "imagenet")
CONV_INITS = ("default", "fan_in", "fan_out")


class ResNet50(nn.Module):
    """ResNet-50 (He et al. 2016): four stages of 3, 4, 6, 3 bottleneck blocks at ``width`` ·
    (1, 2, 4, 8) channels (outputs 4× that), global average pool, one linear layer.

    stem: ``"imagenet"``, the 7x7 stride-2 convolution and 3x3 stride-2 max-pool (for 224x224
    inputs), or ``"cifar"``, one 3x3 stride-1 convolution and no pooling (for 32x32 inputs; the
    ResNet50 of the GraNet/Sup-tickets CIFAR code).
    conv_init: ``"default"`` (PyTorch's), or Kaiming-normal with ``"fan_in"`` or ``"fan_out"``
    (std = sqrt(2 / fan)); NVIDIA's ImageNet ResNet-50 calls these ``-c fanin`` and ``classic``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, width: int = 64, stem: str = "imagenet",
                 conv_init: str = "default"):
        super().__init__()
        if stem not in RESNET50_STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid: {list(RESNET50_STEMS)}")
        if conv_init not in CONV_INITS:
            raise ValueError(f"unknown conv_init {conv_init!r}; valid: {list(CONV_INITS)}")
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, n in enumerate((3, 4, 6, 3)):
            mid = width * 2 ** stage
            for i in range(n):
                blocks.append(_Bottleneck(cin, mid, 2 if stage > 0 and i == 0 else 1))
                cin = mid * _Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)
        if conv_init != "default":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode=conv_init, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(self.blocks(x).mean((2, 3)))


def _resnet50(input_shape, num_classes, width: int = 64, stem: str = "auto", conv_init: str = "default") -> nn.Module:
    """ResNet-50; ``stem`` ``"auto"`` picks ``"cifar"`` for inputs up to 64x64, else ``"imagenet"``."""
    c, size = _image(input_shape, "resnet50")
    if stem == "auto":
        stem = "cifar" if size <= 64 else "imagenet"
    return ResNet50(c, num_classes, width, stem, conv_init)


MODELS["resnet50"] = _resnet50


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """Build a model of :data:`MODELS` for data of ``input_shape`` and ``num_classes``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {list_models()}")
    for key, value in kwargs.items():   # widths, depths, sizes: a layer of -5 units is no model
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values):
            raise ValueError(f"{key} must be positive integers, got {value!r}")
    return MODELS[name](tuple(input_shape), int(num_classes), **kwargs)

