"""Fine-tuning a pre-trained encoder as an image classifier (``launchers/finetune.py``): the
classifier of a config, device-side augmentation, and the trainer. The config tree is
``bootmae_ds.config.finetune``."""
