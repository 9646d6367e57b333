"""lightly's reference training loop for an sslcell recipe: the peer of the ``train_step`` task kind.

What a lightly user writes for the same model and batch, composed as lightly's examples compose it
(``examples/pytorch/simclr.py`` and the torchvision-ViT version of ``examples/pytorch/mae.py``): lightly's transform
on PIL images in a torch ``Dataset`` + ``DataLoader`` with worker processes, lightly's modules and losses, a plain
torch loop. Only the sizes come from the recipe, so both sides train the same network:

* SimCLR: torchvision ``resnet18/34/50`` with the small-image stem of :mod:`sslcell.encoders.resnet` (3x3 stride-1
  first convolution, no max-pool: what lightly's CIFAR benchmarks do), ``SimCLRProjectionHead`` and ``NTXentLoss``
  with the recipe's sizes and temperature, ``SimCLRTransform(input_size=size)``, two views per image.
* MAE: torchvision ``VisionTransformer`` with the recipe's ViT sizes (width, depth, heads, MLP, patch) wrapped in
  ``MaskedVisionTransformerTorchvision``, lightly's ``MAEDecoder`` with the recipe's decoder width, depth and heads,
  ``random_token_mask`` at the recipe's mask rate, MSE on the masked patches, ``MAETransform(input_size=size)``.
  (lightly's current MAE example uses timm's ViT; the torchvision one needs no extra package and uses the same
  attention kernel, ``scaled_dot_product_attention``, as sslcell's ViT.)

The loop: AdamW with the recipe's learning rate and weight decay, ``bf16`` autocast around forward and loss when
asked (as Lightning's ``bf16-mixed``), pinned host memory and non-blocking copies on CUDA (more than lightly's
examples do: the peer gets every advantage sslcell's loader has).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sslcell.config import RecipeConfig
from sslcell.errors import ConfigError


@dataclass
class Reference:
    """A lightly model for a recipe: ``step(model, batch, device) -> loss`` on one DataLoader batch."""

    model: nn.Module
    transform: Callable[[Any], Any]
    step: Callable[[nn.Module, Any, torch.device], Tensor]
    description: str


def supported(config: RecipeConfig) -> str | None:
    """Why lightly's reference cannot mirror ``config`` (None when it can)."""
    name, encoder = config.method.name, config.encoder.name
    if config.modality != "image":
        return f"modality {config.modality!r}: the reference loop trains on crops only"
    if name == "simclr" and encoder in ("resnet18", "resnet34", "resnet50"):
        return None
    if name == "mae" and encoder.startswith("vit"):
        return None
    return (f"method {name!r} with encoder {encoder!r}: lightly's reference exists here for simclr with resnet18/34/50 "
            "and mae with a ViT")


def build_reference(config: RecipeConfig, encoder: nn.Module, channels: int, size: int) -> Reference:
    """lightly's model, transform and step for ``config``; ``encoder`` is sslcell's (its sizes are copied)."""
    why = supported(config)
    if why is not None:
        raise ConfigError(f"recipes: no lightly reference for {why}")
    if channels != 3:
        raise ConfigError(f"lightly's transforms take RGB PIL images: the crops need 3 channels, got {channels}")
    if config.method.name == "simclr":
        return _simclr(config, size)
    return _mae(config, encoder, size)


class LightlySimCLR(nn.Module):
    """lightly's SimCLR example: ``backbone`` -> flatten -> ``SimCLRProjectionHead``."""

    def __init__(self, backbone: nn.Module, embed_dim: int, hidden: int, out: int) -> None:
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(embed_dim, hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W) -> (N, out)``."""
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


def _simclr(config: RecipeConfig, size: int) -> Reference:
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.transforms import SimCLRTransform

    m = config.method
    resnet = getattr(torchvision.models, config.encoder.name)()
    resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # small-image stem
    resnet.maxpool = nn.Identity()
    embed_dim = resnet.fc.in_features
    backbone = nn.Sequential(*list(resnet.children())[:-1])  # without the classifier, as lightly's example
    model = LightlySimCLR(backbone, embed_dim, m.projection_hidden, m.projection_dim)
    criterion = NTXentLoss(temperature=m.temperature)

    def step(model: nn.Module, batch: Any, device: torch.device) -> Tensor:
        x0, x1 = (v.to(device, non_blocking=True) for v in batch[0])
        return criterion(model(x0), model(x1))

    return Reference(model, SimCLRTransform(input_size=size), step,
                     f"torchvision {config.encoder.name} (3x3 stride-1 stem, no max-pool) + SimCLRProjectionHead("
                     f"{embed_dim}, {m.projection_hidden}, {m.projection_dim}) + NTXentLoss(temperature="
                     f"{m.temperature}); SimCLRTransform(input_size={size})")


class LightlyMAE(nn.Module):
    """lightly's MAE example (torchvision ViT): masked encoder on the kept tokens, decoder over all tokens,
    prediction of the masked patches. ``forward(images (N, 3, H, W)) -> (pred, target)``, both
    ``(N, L_masked, p*p*3)``."""

    def __init__(self, vit: nn.Module, mask_ratio: float, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int) -> None:
        from lightly.models.modules import MAEDecoder, MaskedVisionTransformerTorchvision

        super().__init__()
        self.mask_ratio = mask_ratio
        self.patch_size = vit.patch_size
        self.sequence_length = vit.seq_length
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.backbone = MaskedVisionTransformerTorchvision(vit=vit)
        self.decoder = MAEDecoder(
            seq_length=vit.seq_length, num_layers=decoder_depth, num_heads=decoder_heads,
            embed_input_dim=vit.hidden_dim, hidden_dim=decoder_dim, mlp_dim=4 * decoder_dim,
            out_dim=vit.patch_size**2 * 3, dropout=0.0, attention_dropout=0.0,
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        from lightly.models import utils

        n = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(n, self.sequence_length), mask_ratio=self.mask_ratio,
                                                     device=images.device)
        encoded = self.backbone.encode(images=images, idx_keep=idx_keep)  # (N, 1 + L_keep, D)
        tokens = utils.repeat_token(self.mask_token, (n, self.sequence_length))  # (N, 1 + L, Dd)
        tokens = utils.set_at_index(tokens, idx_keep, self.decoder.embed(encoded).type_as(tokens))
        decoded = self.decoder.decode(tokens)
        pred = self.decoder.predict(utils.get_at_index(decoded, idx_mask))  # (N, L_masked, p*p*3)
        patches = utils.patchify(images, self.patch_size)  # (N, L, p*p*3)
        target = utils.get_at_index(patches, idx_mask - 1)  # idx_mask counts the class token
        return pred, target


def _mae(config: RecipeConfig, encoder: nn.Module, size: int) -> Reference:
    from lightly.transforms import MAETransform
    from torchvision.models import VisionTransformer

    m = config.method
    block = encoder.blocks[0]
    vit = VisionTransformer(image_size=size, patch_size=encoder.patch_size, num_layers=len(encoder.blocks),
                            num_heads=block.self_attention.num_heads, hidden_dim=encoder.embed_dim,
                            mlp_dim=block.mlp[0].out_features)
    vit.heads = nn.Identity()  # the classifier is unused by MAE; dropped so the parameter counts compare
    model = LightlyMAE(vit, m.mask_rate, m.decoder_dim, m.decoder_depth, m.decoder_heads)
    criterion = nn.MSELoss()

    def step(model: nn.Module, batch: Any, device: torch.device) -> Tensor:
        images = batch[0][0].to(device, non_blocking=True)  # MAETransform gives one view
        pred, target = model(images)
        return criterion(pred, target)

    return Reference(model, MAETransform(input_size=size), step,
                     f"torchvision VisionTransformer({encoder.embed_dim} wide, {len(encoder.blocks)} blocks, "
                     f"{block.self_attention.num_heads} heads, patch {encoder.patch_size}) in "
                     f"MaskedVisionTransformerTorchvision + MAEDecoder({m.decoder_dim} wide, {m.decoder_depth} blocks, "
                     f"{m.decoder_heads} heads), mask rate {m.mask_rate}, MSE; MAETransform(input_size={size})")


class PILCrops(torch.utils.data.Dataset):
    """Crop ``i`` of ``(N, H, W, 3)`` uint8 as a PIL image through lightly's ``transform``; item ``(views, 0)`` as a
    torchvision data set gives ``(image, target)``."""

    def __init__(self, images_hwc: np.ndarray, transform: Callable[[Any], Any]) -> None:
        self.images, self.transform = images_hwc, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), 0


def make_loader(images_hwc: np.ndarray, reference: Reference, *, batch_size: int, workers: int, pin_memory: bool,
                seed: int) -> torch.utils.data.DataLoader:
    """lightly's example loader: shuffled, ``drop_last``, ``workers`` worker processes."""
    return torch.utils.data.DataLoader(
        PILCrops(images_hwc, reference.transform), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))


def train(reference: Reference, loader: torch.utils.data.DataLoader, config: RecipeConfig, device: torch.device,
          bf16: bool, after_step: Callable[[], bool]) -> None:
    """The plain loop: forward and loss (under bf16 autocast if asked), backward, AdamW step; ``after_step()`` is
    called after every optimiser step and ends the loop when it returns True (epochs repeat until then)."""
    model = reference.model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    while True:
        for batch in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = reference.step(model, batch, device)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if after_step():
                return
