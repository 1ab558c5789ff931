"""centerkern: center loss kernels that get duplicate labels right, for any array framework.

Center loss (Wen et al., ECCV 2016) keeps one center per class, pulls each feature toward its
class center and moves the centers toward the features. Its hot loop is a gather
(``centers[labels]``) and a scatter in which duplicate labels must add up. The contract is
written once, in the docstrings of the three functions below; ``backends()`` lists where they
can run (``numpy``: the reference, ``numba``: parallel CPU kernels, ``cuda``: GPU kernels, which
on device arrays run on the caller's stream without waiting for the GPU: ``sync=``, ``stream=``,
``centerkern.cuda.check_errors``).

Framework adapters live in their own modules, imported only when asked for:
``centerkern.torch`` (an ``nn.Module``), ``centerkern.jax``, ``centerkern.tensorflow`` (a function
on a ``tf.Variable`` and a Keras 3 layer), ``centerkern.distributed`` (``torch.distributed``) and
``centerkern.dask`` (class centers over chunked arrays).
"""

from ._api import CenterLossResult, backends, center_loss, gather_centers, scatter_sub_update
from ._core import rules
from ._core.errors import BackendUnavailableError, PeerInputError

#: The names of the three published center-loss rules, the values ``rule=`` accepts: ``facenet``
#: (the default; davidsandberg/facenet), ``wen`` (Wen et al., ECCV 2016, Eq. 2-4) and
#: ``pytorch`` (KaiyangZhou/pytorch-center-loss). See ``center_loss`` for their formulas.
RULES = rules.RULES

__version__ = "0.5.0.dev0"

__all__ = [
    "CenterLossResult",
    "BackendUnavailableError",
    "PeerInputError",
    "RULES",
    "backends",
    "center_loss",
    "gather_centers",
    "scatter_sub_update",
]
