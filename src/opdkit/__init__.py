"""opdkit: on-policy distillation with the stable teacher-top-K support-set objective.

Importing the package is cheap on purpose: nothing here pulls in torch or transformers.
Import the part you need (``opdkit.losses``, ``opdkit.config``, ...).
"""

__version__ = "0.1.0"
