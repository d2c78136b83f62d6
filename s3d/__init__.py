"""s3d: self-supervised pre-training and fine-tuning of 3D medical segmentation networks."""

__version__ = "0.1.0"
