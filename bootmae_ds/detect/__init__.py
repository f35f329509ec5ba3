"""Object detection and instance segmentation transfer: Mask R-CNN + FPN (torchvision) on the
pre-trained ViT as a feature pyramid, trained and scored on COCO (``launchers/detect.py``)."""
