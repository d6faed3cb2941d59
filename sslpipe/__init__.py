"""sslpipe: self-supervised pretraining for images on PyTorch Lightning."""

__version__ = "0.1.0"
