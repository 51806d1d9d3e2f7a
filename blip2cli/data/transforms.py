"""The pretraining image transform (the evaluation one is ``blip2cli.models.vision.image_transform``)."""

from __future__ import annotations

from torchvision import transforms as T

from ..models.vision import CLIP_MEAN, CLIP_STD, image_transform

__all__ = ["image_transform", "train_transform"]


def _to_rgb(image):
    # a named function rather than a lambda, so the transform pickles into DataLoader workers
    return image.convert("RGB")


def train_transform(image_size: int, min_scale: float = 0.5) -> T.Compose:
    """LAVIS's ``blip2_image_train``: bicubic random-resized crop (scale ``min_scale``..1) and horizontal
    flip, then CLIP normalisation. The paper's augmentation; no RandAugment."""
    return T.Compose(
        [
            T.Lambda(_to_rgb),
            T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
