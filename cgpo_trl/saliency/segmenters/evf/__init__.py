"""EVF-SAM (hustvl/EVF-SAM, Apache-2.0) written in this project so its published weights load without the repository.

`from_pretrained(directory)` strictly loads `YxZhang/evf-sam*` (SAM-1) and `YxZhang/evf-sam2*` (SAM-2) checkpoints;
the `evf-sam` segmenter backend (`cgpo_trl.saliency.segmenters.evf_sam`) wraps it with the published pre-processing.
"""

from .config import Beit3Config, EvfSamConfig
from .model import EvfModel, EvfSam2Model, EvfSamModel, build_model, from_pretrained
from .processing import EvfTokenizer

__all__ = [
    "Beit3Config",
    "EvfModel",
    "EvfSam2Model",
    "EvfSamConfig",
    "EvfSamModel",
    "EvfTokenizer",
    "build_model",
    "from_pretrained",
]
