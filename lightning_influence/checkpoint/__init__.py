"""The checkpoint procedure: influence at one checkpoint for any training loop.

:mod:`.session` runs it (correction pass, scoring, top examples and their token scores, the atomic
write), :mod:`.run_dir` holds a run's output directory against other runs. No Lightning, no W&B:
the callback, the other loops, the CLI and users' own loops share it.
"""
