"""Pretraining data: caption cleaning, image transforms, the synthetic shapes set, annotation files,
webdataset shards, a resumable weighted mixture, and collation."""

from .datasets import CaptionJsonDataset, Mixture, WebDatasetSamples, collate, webdataset_samples
from .synthetic import COLOURS, SHAPES, ShapesDataset, caption, render_shape
from .text import pre_caption, pre_question
from .transforms import image_transform, train_transform

__all__ = [
    "COLOURS",
    "SHAPES",
    "CaptionJsonDataset",
    "Mixture",
    "ShapesDataset",
    "WebDatasetSamples",
    "caption",
    "collate",
    "image_transform",
    "pre_caption",
    "pre_question",
    "render_shape",
    "train_transform",
    "webdataset_samples",
]
