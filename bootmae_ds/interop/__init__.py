"""Weights in and out of other layouts: the official BootMAE checkpoints (``official``), MAE's and
timm's ViT keys (``mae``), encoders read from runs and released files (``encoders``), the initial
weights of a pre-training run (``init_sources`` reads them, ``pretrain_init`` applies them), and
the exports to timm's ViT (``export``) and to the official BootMAE file layout
(``official_export``)."""
