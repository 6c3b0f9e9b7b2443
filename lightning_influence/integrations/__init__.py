"""Influence from training loops other than a Lightning ``Trainer``, over the same core.

* :mod:`lightning_influence.integrations.fabric`: ``InfluenceMonitor`` for Lightning Fabric loops
  (needs ``lightning``: ``pip install lightning-influence[fabric]``).
* :mod:`lightning_influence.integrations.hf`: ``InfluenceTrainerCallback`` for the Hugging Face
  ``Trainer`` (needs ``transformers``: ``pip install lightning-influence[hf]``).

Both collect curvature statistics from the loop's own training steps
(:class:`~lightning_influence.collector.StepStatistics`), compute influence at the checkpoints they
are asked for (:class:`~lightning_influence.session.InfluenceSession`) and write the same
``<output_dir>/step=<N>/`` results as the callback. Nothing is imported here: each integration
imports its framework only when it is imported itself.
"""
