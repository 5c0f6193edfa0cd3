"""``StudyDataset``: a torch Dataset of multi-view studies, from a prepared cache (fast) or a manifest (decodes).

Item dict (the contract the model and retrieval code rely on): ``images`` FloatTensor [max_views, 3, H, W] (zeros
where no view), ``view_mask`` BoolTensor [max_views], ``view_types`` LongTensor [max_views] (``VIEW_TYPES`` index),
``report`` str, ``labels`` FloatTensor [14] (NaN = blank), ``study_id`` str, ``patient_id`` str, ``index`` int.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch.utils.data

from rvl.constants import CHEXPERT_LABELS, FRONTAL_VIEWS, VIEW_TYPES, view_type_id

__all__ = ["StudyDataset", "collate_studies", "default_image_transform", "select_views"]

logger = logging.getLogger(__name__)

DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25
_MAX_SUBSTITUTIONS = 16


def default_image_transform(image) -> torch.Tensor:
    """PIL 'L' (or uint8 array) -> float [3, H, W]: [0, 1], repeated to 3 channels, normalised mean 0.5 std 0.25."""
    array = np.array(image, dtype=np.uint8)  # a copy: the source may be a read-only cache buffer
    scale, shift = 1.0 / (255.0 * DEFAULT_STD), DEFAULT_MEAN / DEFAULT_STD
    tensor = torch.from_numpy(array).to(torch.float32).mul_(scale).sub_(shift)
    return tensor.unsqueeze(0).expand(3, -1, -1).contiguous()


def select_views(view_positions: list[str], max_views: int, rng: np.random.Generator | None) -> list[int]:
    """Indices of up to ``max_views`` distinct views, frontal views first.

    ``rng`` given (training): a random subset of size min(n, max_views) drawn without replacement. ``rng`` None
    (evaluation): deterministic, frontal views first then the file order. Never repeats a view.
    """
    n = len(view_positions)
    k = min(n, max_views)
    chosen = list(range(n)) if rng is None else [int(i) for i in rng.choice(n, size=k, replace=False)]
    chosen.sort(key=lambda i: (view_positions[i] not in FRONTAL_VIEWS, 0 if rng is not None else i))
    return chosen[:k]


class StudyDataset(torch.utils.data.Dataset):
    """Studies from a prepared cache folder (``rvl prepare`` output) or directly from a manifest.

    Args:
        source: prepared cache folder, or anything ``read_manifest`` accepts (images are then decoded on the fly and
            resized/padded to ``size`` exactly as ``rvl prepare`` would).
        split: keep only this split ("train", "validate", "test"); None keeps all.
        max_views: view slots per study.
        image_transform: PIL 'L' uint8 image -> FloatTensor [3, H, W]; None uses ``default_image_transform``.
        train: random view subsets (seeded by (seed, epoch, index)); False: frontal first, deterministic.
        seed: base seed of the view sampling.
        size: image side when decoding from a manifest (ignored for a cache, which has its own size).
        strict: raise on an unreadable image (manifest source); otherwise the view is dropped, counted in
            ``skipped`` and logged, and a study with no readable view is replaced by the next one.
        format: manifest format for ``read_manifest``.
        degenerate: views that cannot be a radiograph (smaller than ``min_side`` px, or every pixel equal):
            ``"allow"`` uses them (training default), ``"refuse"`` raises ``DegenerateImageError`` naming the file,
            ``"skip"`` drops the view (counted in ``skipped_degenerate`` and logged) like an unreadable one. A cache
            holds resized squares: its recorded original sizes are checked (caches of version 1 lack them, so there
            only flat content is detected).
        min_side: smallest accepted side for ``degenerate`` (manifest sources: the original image size).
    """

    def __init__(self, source: str | os.PathLike, split: str | None = None, max_views: int = 2,
                 image_transform: Callable | None = None, train: bool = True, seed: int = 0, size: int = 256,
                 strict: bool = False, format: str = "auto", degenerate: str = "allow", min_side: int = 32,
                 **reader_kwargs: Any):
        if max_views < 1:
            raise ValueError(f"max_views must be >= 1, got {max_views}")
        if degenerate not in ("allow", "refuse", "skip"):
            raise ValueError(f"degenerate must be allow, refuse or skip, got {degenerate!r}")
        self.degenerate, self.min_side, self.skipped_degenerate = degenerate, min_side, 0
        self.source = Path(source)
        self.max_views, self.image_transform, self.train = max_views, image_transform, train
        self.seed, self.strict, self.epoch, self.skipped = seed, strict, 0, 0
        self.is_cache = (self.source / "prepare.json").exists()
        if self.is_cache:
            from rvl.data.cache_files import load_cache, read_cache_frame

            _, info = load_cache(self.source)
            self.size = int(info["size"])
            frame = read_cache_frame(self.source)
        else:
            from rvl.data.manifest import read_manifest

            self.size = size
            frame = read_manifest(self.source, format=format, **reader_kwargs)
        if split is not None:
            keep = (frame["split"] == split).to_numpy()
            if not keep.any():
                raise ValueError(f"{self.source}: no study in split {split!r}; splits present: "
                                 f"{sorted(frame['split'].unique())}")
            self._rows = np.flatnonzero(keep)
            frame = frame[keep].reset_index(drop=True)
        else:
            self._rows = np.arange(len(frame))
        self.frame = frame
        self._labels = frame[CHEXPERT_LABELS].to_numpy(dtype=np.float32)
        self._view_ids = [[view_type_id(v) for v in views] for views in frame["view_positions"]]
        # plain lists: a pandas row lookup per item would cost more than reading the pixels
        self._views = [list(v) for v in frame["view_positions"]]
        self._paths = [list(p) for p in frame["image_paths"]]
        # a cache's original image sizes (version 2 on): a tiny original is caught behind its resized square
        self._original_sizes = list(frame["image_sizes"]) if "image_sizes" in frame else None  # (h, w) per view
        self._text = list(zip(frame["report"].astype(str), frame["study_id"].astype(str),
                              frame["patient_id"].astype(str)))
        self._pixels = None  # pyarrow column of the cache, opened lazily (and again in each DataLoader worker)

    def __len__(self) -> int:
        return len(self.frame)

    def set_epoch(self, epoch: int) -> None:
        """Change the view sampling (training mode) for a new epoch.

        Call it before creating the epoch's DataLoader iterator; with ``persistent_workers=True`` the workers keep
        the copy they started with.
        """
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pixels"] = None  # never pickle the memory-mapped table into DataLoader workers; they re-open it
        return state

    # -------------------------------------------------------------------------------------------------- reading
    def _cache_column(self):
        if self._pixels is None:
            from rvl.data.cache_files import load_cache

            data, _ = load_cache(self.source)  # checked once per process (workers re-open, the hash is remembered)
            self._pixels = data.data.table.column("pixels")
        return self._pixels

    def _study_images(self, i: int, chosen: list[int]) -> list[np.ndarray | None]:
        """uint8 (size, size) arrays for the chosen views of study ``i`` (None for a view that failed to read)."""
        if self.is_cache:
            views = self._cache_column()[int(self._rows[i])].values
            squares = [np.frombuffer(views[j].as_buffer(), np.uint8).reshape(self.size, self.size) for j in chosen]
            sizes = self._original_sizes[i] if self._original_sizes is not None else [None] * len(squares)
            return [a if self._usable(_content(a), self._paths[i][j], 0 if sizes[j] is None else self.min_side,
                                      sizes[j]) else None for j, a in zip(chosen, squares)]
        from rvl.data.io import DegenerateImageError, ImageReadError, read_image, to_square_uint8

        out = []
        for j in chosen:
            path = self._paths[i][j]
            try:
                image = read_image(path)
                out.append(to_square_uint8(image, self.size) if self._usable(image, path, self.min_side) else None)
            except ImageReadError as e:
                if self.strict or isinstance(e, DegenerateImageError):  # degenerate="refuse" asked for the error
                    raise
                self.skipped += 1
                logger.warning("skipped unreadable image (%d so far): %s", self.skipped, e)
                out.append(None)
        return out

    def _usable(self, image: np.ndarray, path: str, min_side: int, original: tuple[int, int] | None = None) -> bool:
        """Apply the ``degenerate`` policy to one view: True to use it, False to skip it (or raise)."""
        if self.degenerate == "allow":
            return True
        from rvl.data.io import DegenerateImageError, check_not_degenerate

        try:
            check_not_degenerate(image, path, min_side, original_shape=original)
        except DegenerateImageError as e:
            if self.degenerate == "refuse":
                raise
            self.skipped_degenerate += 1
            logger.warning("skipped degenerate view (%d so far): %s", self.skipped_degenerate, e)
            return False
        return True

    def _to_tensor(self, array: np.ndarray):
        if self.image_transform is None:
            return default_image_transform(array)
        from PIL import Image

        return self.image_transform(Image.fromarray(np.ascontiguousarray(array)))  # uint8 2-D -> mode 'L'

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"study index {index} out of range for {len(self)} studies")
        for attempt in range(_MAX_SUBSTITUTIONS):
            i = (index + attempt) % len(self)
            views = self._views[i]
            rng = np.random.default_rng((self.seed, self.epoch, i)) if self.train else None
            chosen = select_views(views, self.max_views, rng)
            arrays = self._study_images(i, chosen)
            pairs = [(j, a) for j, a in zip(chosen, arrays) if a is not None]
            if pairs:
                break
            logger.warning("study %s has no readable view; using the next study", self._text[i][1])
        else:
            raise ValueError(f"{self.source}: {_MAX_SUBSTITUTIONS} consecutive studies without a readable image (from "
                             f"study {self._text[index][1]}); check the image paths (see the warnings above)")
        images = self._stack([a for _, a in pairs])
        view_mask = torch.zeros(self.max_views, dtype=torch.bool)
        view_mask[:len(pairs)] = True
        view_types = torch.full((self.max_views,), VIEW_TYPES.index("OTHER"), dtype=torch.long)
        view_types[:len(pairs)] = torch.tensor([self._view_ids[i][j] for j, _ in pairs], dtype=torch.long)
        report, study_id, patient_id = self._text[i]
        return {"images": images, "view_mask": view_mask, "view_types": view_types, "report": report,
                "labels": torch.from_numpy(self._labels[i].copy()), "study_id": study_id, "patient_id": patient_id,
                "index": i}

    def _stack(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """[max_views, 3, H, W] tensor of the transformed views, zeros in the unused slots."""
        if self.image_transform is not None:
            tensors = [self._to_tensor(a) for a in arrays]
            images = torch.zeros((self.max_views, *tensors[0].shape), dtype=tensors[0].dtype)
            for slot, tensor in enumerate(tensors):
                images[slot] = tensor
            return images
        # default transform written straight into the output: one uint8->float pass per view, no temporaries
        height, width = arrays[0].shape
        images = torch.empty((self.max_views, 3, height, width), dtype=torch.float32)
        images[len(arrays):] = 0.0
        scale, shift = 1.0 / (255.0 * DEFAULT_STD), DEFAULT_MEAN / DEFAULT_STD
        for slot, array in enumerate(arrays):
            channel = images[slot, 0]
            np.copyto(channel.numpy(), array, casting="unsafe")  # cache buffers are read-only: no torch view on them
            channel.mul_(scale).sub_(shift)
            images[slot, 1:] = channel
        return images

    def finding_boxes(self, index: int) -> list[list[dict]]:
        """Per-image finding boxes of a study (normalised; in the padded square frame for a cache)."""
        return json.loads(self.frame["finding_boxes"].iloc[index])

    def __repr__(self) -> str:
        kind = "cache" if self.is_cache else "manifest"
        return (f"StudyDataset({str(self.source)!r}, {kind}, studies={len(self)}, size={self.size}, "
                f"max_views={self.max_views}, train={self.train})")


def _content(square: np.ndarray) -> np.ndarray:
    """The padded square's image region: the bounding box of its non-zero pixels (all of it when all are zero)."""
    rows, cols = np.flatnonzero(square.any(axis=1)), np.flatnonzero(square.any(axis=0))
    if not len(rows):
        return square
    return square[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def collate_studies(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of a list of study items; strings stay lists, ``index`` becomes a LongTensor."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key == "index":
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out
