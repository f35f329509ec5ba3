"""BootMAE pre-training, the method: losses, the teacher (momentum encoder), its schedules, FLOPs
for MFU, reconstruction previews, and the trainer (``launchers/pretrain.py``)."""
