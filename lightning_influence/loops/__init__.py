"""The training loops: each translates its loop's events into the shared protocol.

* :mod:`.protocol`: ``LoopProtocol``, the events every loop sends; it owns the collection cadence,
  the triggers and the per-step monitors (:mod:`.monitoring`, :mod:`.ledger`).
* :mod:`.shared`: what it builds on (settings, statistics, the checkpoint procedure, results on disk
  and their publishing) and ``LoopResults``, what every loop exposes of it.
* :mod:`.callback`: ``InfluenceCallback`` for Lightning ``Trainer`` runs (:mod:`.trainer` reads the
  trainer).
* :mod:`.fabric`: ``InfluenceMonitor`` for Lightning Fabric loops (``pip install lightning-influence[fabric]``).
* :mod:`.hf`: ``InfluenceTrainerCallback`` for the Hugging Face ``Trainer``
  (``pip install lightning-influence[hf]``).

Nothing is imported here: each loop imports its framework only when it is imported itself.
"""
