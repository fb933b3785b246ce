"""RigFace at cluster scale: datasets from portrait videos, dual-UNet training, identity-preserving face edits."""

__version__ = "0.1.0"
