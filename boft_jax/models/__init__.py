"""Flax models that load Hugging Face checkpoints: ``vit`` (ViTForImageClassification) and
``t5`` (T5ForConditionalGeneration: T5, T5 v1.1, FLAN-T5, mT5).

    from boft_jax import models
    module, params = models.from_pretrained("path/to/hf_dir")   # dispatches on model_type
    models.save_pretrained("out_dir", module, params)           # transformers loads it
"""

from boft_jax.models import hf, t5, vit
from boft_jax.models.hf import from_pretrained, save_pretrained

__all__ = ["hf", "t5", "vit", "from_pretrained", "save_pretrained"]
