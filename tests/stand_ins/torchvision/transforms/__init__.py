from .._stand_in import module_getattr
from . import functional
from .functional import InterpolationMode

__getattr__ = module_getattr(__name__)
