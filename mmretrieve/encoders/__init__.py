"""Encoders: one interface for text and image towers, and the factory that builds them."""

from .factory import create_encoder, list_encoders

__all__ = ["create_encoder", "list_encoders"]
