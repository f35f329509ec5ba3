"""Weights in and out of other layouts: the official BootMAE checkpoints (``official``), encoders
read from runs and released files (``encoders``), and the export to timm's ViT (``export``)."""
