"""SVF adapters as composable experts (Transformers², arXiv 2501.06252).

`arithmetic` adds, subtracts and interpolates SVF experts trained on one base and swaps them in place; `dispatch` is
the paper's two-pass adaptation: a first pass picks the expert (or a few-shot mixture of them) for a query, the
second runs the query with it. Both read and write adapters only through `svdtune.io`.
"""

from .arithmetic import Expert, add, combine, interpolate, load_expert, save_expert, subtract
from .dispatch import CEMConfig, Example, ExpertMixer, TwoPass

__all__ = ["CEMConfig", "Example", "Expert", "ExpertMixer", "TwoPass", "add", "combine", "interpolate", "load_expert",
           "save_expert", "subtract"]
