"""Checkpoint formats: blip2's own, transformers' BLIP-2 directories, and LAVIS files."""
