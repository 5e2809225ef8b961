"""The model zoo. Importing this package registers every model (see :mod:`ctr.models.registry`)."""
from ctr.models import cetnet, dcnv2, dhen, dlrm, interformer  # noqa: F401  (register their models)
from ctr.models.registry import get, names, register  # noqa: F401
