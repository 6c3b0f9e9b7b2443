"""``InfluenceCallback`` for ``lightning.pytorch`` Trainers (``import lightning as L``).

The same implementation as :class:`lightning_influence.InfluenceCallback`, bound to the
``lightning.pytorch`` ``Callback`` base class that package's Trainer requires.
"""

from lightning.pytorch import Callback

from lightning_influence.loops.callback import InfluenceCallbackMixin


class InfluenceCallback(InfluenceCallbackMixin, Callback):
    __doc__ = InfluenceCallbackMixin.__doc__ + "\n    For ``lightning.pytorch`` Trainers.\n"


__all__ = ["InfluenceCallback"]
