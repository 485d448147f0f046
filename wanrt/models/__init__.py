"""Faithful PyTorch models of Wan2.1 FLF2V-14B with official parameter names."""

from .config import CLIPConfig, DiTConfig, T5Config, VAEConfig, WanConfig
from .loading import WanModels, build, load

__all__ = ["CLIPConfig", "DiTConfig", "T5Config", "VAEConfig", "WanConfig", "WanModels", "build", "load"]
