"""Model-side helpers shared by the index, search, zero-shot, heatmap and evaluate commands.

Loading a model folder, fingerprinting it, reading radiographs into the model's input frame, and embedding studies /
reports in batches. torch and the model are imported inside the functions, so ``import rvl.retrieval`` stays light.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# files of an rvl model folder that define its embeddings (see rvl.model.factory.save_pretrained)
_MODEL_FILES = ("open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                "rvl_config.json", "rvl/rvl_heads.safetensors", "config.json", "tokenizer.json")


def model_fingerprint(model_or_dir: Any, model: Any = None) -> str:
    """A short, stable identifier of a model's weights: sha256 of its folder's weight/config files, or of an
    in-memory model's state dict (tensor names, shapes and bytes).

    A source that is not a folder (``hf-hub:ORG/NAME``, ``NAME:TAG``) is fingerprinted by its loaded weights: pass the
    loaded ``model`` to avoid loading it again.
    """
    digest = hashlib.sha256()
    if isinstance(model_or_dir, (str, os.PathLike)) and not Path(str(model_or_dir).removeprefix("local-dir:")).is_dir():
        return model_fingerprint(model if model is not None else load_model(model_or_dir, "cpu"))
    if isinstance(model_or_dir, (str, os.PathLike)):
        folder = Path(str(model_or_dir).removeprefix("local-dir:"))
        files = [folder / name for name in _MODEL_FILES if (folder / name).is_file()]
        if not files:
            raise FileNotFoundError(f"{folder}: no model files ({', '.join(_MODEL_FILES[:2])}); not a model folder")
        for path in files:
            digest.update(path.relative_to(folder).as_posix().encode())
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(chunk)
    else:
        for name, tensor in sorted(model_or_dir.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:24]


def load_model(model_dir: str | os.PathLike, device: str | None = None):
    """A model in eval mode on ``device`` (CUDA when available unless given) from an rvl export, an unmodified
    open_clip model (``local-dir:DIR`` or its folder, ``hf-hub:ORG/NAME``) or ``NAME:TAG`` (open_clip name + tag);
    see :func:`rvl.model.sources.load_model_source`."""
    from rvl.model.sources import load_model_source

    return load_model_source(str(model_dir), device)


def model_device(model: Any):
    return next(model.parameters()).device


def read_square(path: str | os.PathLike, size: int, min_side: int | None = None, override: str = "") -> np.ndarray:
    """A radiograph as the model sees it: uint8 ``size`` x ``size``, aspect kept, centred zero padding (the same
    geometry as ``rvl prepare``). With ``min_side``, a smaller or flat image raises ``DegenerateImageError`` (whose
    message ends with ``override``: how the caller lets it through)."""
    from rvl.data.io import check_not_degenerate, read_image, to_square_uint8

    image = read_image(path)
    if min_side is not None:
        check_not_degenerate(image, path, min_side, override)
    return to_square_uint8(image, size)


def images_to_tensor(model: Any, squares: Sequence[np.ndarray]):
    """uint8 square images -> the model's eval input [N, 3, H, W] (its open_clip ``preprocess``)."""
    import torch
    from PIL import Image

    return torch.stack([model.preprocess(Image.fromarray(np.ascontiguousarray(a))) for a in squares])


def study_tensors(model: Any, paths: Sequence[str | os.PathLike], views: Sequence[str] | None = None,
                  max_views: int | None = None, min_side: int | None = None, override: str = "") -> dict[str, Any]:
    """Images of one study -> ``encode_study`` inputs with a batch of 1 (frontal views first); only the views that
    fit ``max_views`` are read (``min_side`` / ``override``: see :func:`read_square`)."""
    from rvl.constants import normalize_view
    from rvl.data.dataset import select_views

    views = [normalize_view(v) for v in (views or ["OTHER"] * len(paths))]
    order = select_views(views, max_views or len(paths), None)
    squares = [read_square(paths[i], model.image_size, min_side, override) for i in order]
    batch = study_batch(model, squares, [views[i] for i in order])
    return {**batch, "order": order}


def study_batch(model: Any, squares: Sequence[np.ndarray], views: Sequence[str] | None = None,
                max_views: int | None = None) -> dict[str, Any]:
    """Square uint8 views of one study (:func:`read_square`) -> ``encode_study`` inputs with a batch of 1, frontal
    views first; ``"order"`` lists which of ``squares`` were used, in slot order."""
    import torch

    from rvl.constants import normalize_view, view_type_id
    from rvl.data.dataset import select_views

    views = [normalize_view(v) for v in (views or ["OTHER"] * len(squares))]
    order = select_views(views, max_views or len(squares), None)  # frontal views first, then file order
    images = images_to_tensor(model, [squares[i] for i in order])
    return {"images": images[None], "view_mask": torch.ones(1, len(order), dtype=torch.bool),
            "view_types": torch.tensor([[view_type_id(views[i]) for i in order]], dtype=torch.long), "order": order}


def embed_dataset(model: Any, dataset: Any, batch_size: int = 32, num_workers: int = 0,
                  reports: bool = True, desc: str = "embedding") -> dict[str, np.ndarray]:
    """Study (fused multi-view) and report embeddings of a :class:`rvl.data.StudyDataset`, in dataset order.

    Returns:
        ``{"study": (N, D) float32, "report": (N, D) float32 or absent, "index": (N,) dataset rows}``.
    """
    import torch
    from tqdm.auto import tqdm

    from rvl.data import collate_studies

    device = model_device(model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_studies)
    studies, texts, rows = [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
                studies.append(model.encode_study(batch["images"].to(device), batch["view_mask"].to(device),
                                                  batch["view_types"].to(device)).float().cpu().numpy())
                texts.extend(batch["report"])
                rows.append(batch["index"].numpy())
    finally:
        model.train(was_training)
    out = {"study": np.concatenate(studies).astype(np.float32), "index": np.concatenate(rows)}
    if reports:
        out["report"] = embed_texts(model, texts, batch_size=max(batch_size, 64))
    return out


def embed_texts(model: Any, texts: Iterable[str], batch_size: int = 64) -> np.ndarray:
    """Report / prompt embeddings (normalised) as float32 numpy."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, model.embed_dim), np.float32)
    return model.encode_reports(texts, batch_size=batch_size).float().cpu().numpy().astype(np.float32)
