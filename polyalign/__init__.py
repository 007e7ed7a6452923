"""polyalign: make a model that is safe in English safe in every language.

Two training methods (MLC, MSD) and a multilingual safety evaluation harness; see
``docs/`` and ``../shared/docs/METHODS.md`` for the specs they follow.
"""

from polyalign.errors import PolyalignError

__version__ = "0.1.0"
__all__ = ["PolyalignError", "__version__"]
