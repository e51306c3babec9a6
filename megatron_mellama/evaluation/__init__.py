"""Multiple-choice evaluation scored by log-likelihood, as lm-evaluation-harness scores it.

`tasks` (the JSONL task format) -> `requests` (token rows) -> `scoring` (acc, acc_norm) with a
`loglikelihood_fn` from `loglikelihood` (one process) or from the training engine.
"""
