"""The study/report model: open_clip towers plus rvl's view-type embeddings, fusion, caption decoder and label head.

Modules: :mod:`rvl.model.core` (the model), :mod:`rvl.model.heads` (fusion and decoder blocks), :mod:`rvl.model.loss`
(contrastive + caption + label-aware objectives), :mod:`rvl.model.factory` (configs, ``create_model``,
``from_pretrained``) and :mod:`rvl.model.export` (``save_pretrained``: an open_clip-loadable folder).
"""
from __future__ import annotations

from rvl.model.core import RVLModel, report_text_for_model
from rvl.model.export import save_pretrained
from rvl.model.factory import create_model, from_pretrained, get_model_config, list_models

__all__ = ["RVLModel", "create_model", "from_pretrained", "save_pretrained", "get_model_config", "list_models",
           "report_text_for_model"]
