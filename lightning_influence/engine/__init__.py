"""The engine: hooks → statistics → preconditioner → scores, in plain PyTorch.

:mod:`.tracking` picks the layers and captures their inputs and output gradients, :mod:`.passes`
runs the engine's own forward/backward passes, :mod:`.collector` sums curvature statistics from
training steps into :mod:`.statistics` (the engine's own passes over data for them are in
:mod:`.curvature_passes`, the per-example gradient arithmetic they share in :mod:`.example_gradients`),
:mod:`.fitting` turns statistics into :mod:`.factors` (the preconditioner and its storage) of one of the
:mod:`.approximations` (one registered class per strategy), :mod:`.freshness` measures how stale
training-time statistics are, :mod:`.queries` preconditions query gradients and :mod:`.scoring`
computes pairwise scores, :mod:`.sharding` and
:mod:`.distributed` spread the work over processes, and :mod:`.oracle` is the dense reference the
tests compare against. No Lightning, no W&B.
"""
