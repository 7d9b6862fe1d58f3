"""``lesseg pretrain``: self-supervised encoder pretraining on unlabeled images (any split of any dataset),
for data far from ImageNet or machines without network access. Built on lightly's heads, losses and
augmentations; the product ``<out>/encoder.pt`` is what ``model.pretrained`` takes.

Methods (``pretrain.method``): ``simclr`` (image-level contrast, in-batch negatives) and ``densecl``
(MoCo v2's image-level contrast plus contrast between matched locations of the feature map; the dense term
is what suits segmentation).
"""

from ..errors import LessegError

try:  # lightly's transforms also need lightning_utilities, which `pip install --no-deps lightly` leaves out
    import lightly.loss
    import lightly.transforms  # noqa: F401
except ImportError as e:
    raise LessegError(
        f"lesseg pretrain needs lightly ({e}): pip install --no-deps lightly lightning-utilities "
        "(or pip install 'lesseg[pretrain]', whose hydra-core downgrades omegaconf)"
    ) from e

from .base import SSL_METHODS, SSLMethod, Student
from .config import PretrainConfig, PretrainRun, from_dict, load
from .runner import Pretrainer, pretrain

__all__ = [
    "SSL_METHODS",
    "PretrainConfig",
    "PretrainRun",
    "Pretrainer",
    "SSLMethod",
    "Student",
    "from_dict",
    "load",
    "pretrain",
]
