"""EVF-SAM (hustvl/EVF-SAM, Apache-2.0) written in this project so its published weights load without the repository.

`EvfSamModel.from_pretrained(directory)` strictly loads `YxZhang/evf-sam` / `YxZhang/evf-sam-multitask` checkpoints;
the `evf-sam` segmenter backend (`cgpo_trl.saliency.segmenters.evf_sam`) wraps it with the published pre-processing.
"""

from .config import Beit3Config, EvfSamConfig
from .model import EvfSamModel
from .processing import EvfTokenizer

__all__ = ["Beit3Config", "EvfSamConfig", "EvfSamModel", "EvfTokenizer"]
