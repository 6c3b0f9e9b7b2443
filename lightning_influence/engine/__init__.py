"""The engine: hooks → statistics → preconditioner → scores, in plain PyTorch.

:mod:`.tracking` picks the layers and captures their inputs and output gradients, :mod:`.passes`
runs the engine's own forward/backward passes, :mod:`.collector` sums curvature statistics from
training steps, :mod:`.factors` turns statistics into preconditioners, :mod:`.freshness` measures how
stale training-time statistics are, :mod:`.scoring` computes pairwise scores, :mod:`.sharding` and
:mod:`.distributed` spread the work over processes, and :mod:`.oracle` is the dense reference the
tests compare against. No Lightning, no W&B.
"""
