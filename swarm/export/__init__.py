"""Export of a finished run (solo checkpoint or a swarm's saved state) as a Hugging Face
transformers model folder: Llama for dense presets, Mixtral for MoE presets (see docs/export.md)."""

from swarm.export.hf import ExportError, hf_config, hf_tensors, write_hf_folder
from swarm.export.source import ExportSource, load_source

__all__ = ["ExportError", "ExportSource", "hf_config", "hf_tensors", "load_source", "write_hf_folder"]
