"""Training runs: the loop, its checkpoints, and one fine-tuning run as a recipe.

`loop` is the training loop on HF Accelerate (exact resume through `checkpoint`, the run record a resume must match
in `runrecord`, peak memory in `measure`); `recipes` is one fine-tuning run from a model name to per-example scores
(an svdtune method, a head-only run, or one of the `references`: full fine-tuning and PEFT's own methods). The loop
knows nothing of tasks or methods beyond the adapters' regularisers and the rank allocator.
"""

from .loop import TrainConfig, TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train"]
