"""raytron: Ray-orchestrated pretraining of MoE and hybrid LLMs.

The subpackages live in the repository's top-level folders (launcher/, parallelism/, models/,
data_pipeline/, ops/) and are mapped under this package by pyproject.toml.
"""

__version__ = "0.1.0"
