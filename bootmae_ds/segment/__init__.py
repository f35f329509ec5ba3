"""Semantic segmentation transfer: UperNet on the pre-trained ViT (the official Segmentation recipe)."""
