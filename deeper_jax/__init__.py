"""deeper_jax: DeeperCluster (Caron et al., 2019) in JAX/Flax.

``deeper_jax.load_pretrained(path)`` loads an exported backbone (see
``python -m deeper_jax.main --mode export``) as ``(module, variables)``.
"""


def load_pretrained(path: str):
  """``(module, variables)`` of an export; see :func:`deeper_jax.export.load_pretrained`."""
  from deeper_jax import export  # lazy: importing the package stays cheap
  return export.load_pretrained(path)
