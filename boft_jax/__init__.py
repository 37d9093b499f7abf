"""boft_jax: Orthogonal Butterfly Finetuning (BOFT) and OFT for JAX/Flax.

The math (:mod:`boft_jax.orthogonal`, :mod:`boft_jax.butterfly`) is pure JAX/numpy; the Flax
transformation lives in :mod:`boft_jax.linen`.  The exact definition: :mod:`boft_jax.butterfly` and :mod:`boft_jax.orthogonal`.
"""

from boft_jax.butterfly import (
    butterfly_permutations,
    max_factors,
    num_layer_params,
    rotate,
    rotate_kernel,
    rotation_matrix,
    structure_error,
    valid_block_sizes,
)
from boft_jax.config import BOFTConfig, LayerStructure
from boft_jax.host_memory import keep_freed_memory
from boft_jax.orthogonal import cayley, num_skew_params, pack_skew, solve_identity_plus_skew, unpack_skew

__version__ = "0.1.0"

__all__ = [
    "BOFTConfig",
    "LayerStructure",
    "butterfly_permutations",
    "cayley",
    "keep_freed_memory",
    "solve_identity_plus_skew",
    "max_factors",
    "num_layer_params",
    "num_skew_params",
    "pack_skew",
    "rotate",
    "rotate_kernel",
    "rotation_matrix",
    "structure_error",
    "unpack_skew",
    "valid_block_sizes",
]

from boft_jax.linen import (  # noqa: E402  (Flax-specific code after the pure math)
    BOFTKernel,
    BOFTModule,
    combine,
    count_params,
    init_adapter,
    layer_paths,
    merge,
    split,
    unmerge,
    wrap,
)

__all__ += ["BOFTKernel", "BOFTModule", "combine", "count_params", "init_adapter", "layer_paths", "merge", "split", "unmerge", "wrap"]

from boft_jax.multi import BASE, apply_multi, generate_multi, stack, unstack  # noqa: E402

__all__ += ["BASE", "apply_multi", "generate_multi", "stack", "unstack"]
