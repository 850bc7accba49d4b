"""`svdtune bench`: every method against LoRA on one fair protocol, and the leaderboard that answers the question.

`suites` names what runs (model, tasks, steps, seeds, budgets, reference rows); `protocol` decides how a comparison is
judged (validation carved from the training rows, the learning-rate grid, paired bootstrap intervals, verdicts, the
answer sentence); `runner` runs a suite run by run, resumably; `report` turns the results into the leaderboard and
plots; `machine` records what the results were measured on.
"""
