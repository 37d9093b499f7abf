"""Interoperability with other BOFT implementations (no torch import, no pickle).

- :mod:`boft_jax.interop.peft`: Hugging Face PEFT BOFT and OFT adapters (``adapter_config.json`` +
  ``adapter_model.safetensors``) <-> boft_jax (:func:`load_peft_adapter`, :func:`save_peft_adapter`).
- ``python -m boft_jax.interop``: command line conversion (PEFT <-> orbax adapter checkpoints) and
  merged Hugging Face model export; see ``python -m boft_jax.interop --help``.
"""

from boft_jax.interop.peft import load_peft_adapter, read_peft_adapter, save_peft_adapter

__all__ = ["load_peft_adapter", "read_peft_adapter", "save_peft_adapter"]
