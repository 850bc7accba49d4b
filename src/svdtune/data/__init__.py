"""Where examples and models come from, and how rows become batches.

The embedded real models (`models`: SmolLM2-135M-Instruct, all-MiniLM-L6-v2, installed as wheels, never from a hub),
the movie-review sentences (`sentiment`), the multiple-choice and math benchmarks (`evalsets`), users' JSONL/CSV files
(`userfiles`), the task registry that names them (`tasks`), and the encoders that turn rows into batches and score a
model on them: sequence classification (`classification`) and causal-LM answers (`causal_lm`: packed prompt-sharing
choice scores, exact match, answer-only loss). Nothing here trains: `svdtune.train` does.
"""
