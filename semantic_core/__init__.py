"""semantic core: models, the batch engine, agent memory and the HTTP API. No UI code lives here.

Importing this package chooses the CPU BLAS before MLX is loaded (see `semantic_core.model.blas`),
which is why it must be imported before `mlx`.
"""

from semantic_core.model.blas import setup_blas as _setup_blas

__version__ = "0.1.0"

_setup_blas()
