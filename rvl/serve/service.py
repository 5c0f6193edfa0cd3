"""The in-process API behind ``rvl serve``: one model, its study (and report) index, and a cache of studies.

Everything the HTTP routes answer comes from :class:`StudyService` methods returning JSON-able dicts, so the web API
adds only transport; ``bench/bench_serve.py`` measures that overhead by calling both. The model and indexes load once;
a study's embedding, its views and (after the first heatmap) its patch tokens stay in an LRU cache while the server
runs, so clicking through findings costs one text embedding and one matrix product per view.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np

from rvl.constants import CHEXPERT_LABELS
from rvl.serve.studies import LRUCache, ServiceError, StudyEntry, optional_text, parse_date

logger = logging.getLogger(__name__)

DEFAULT_K = 8
MAX_K = 100


def _load_index(path: str | Path | None, kind: str, fingerprint: str, dim: int) -> tuple[Any, str | None]:
    """(index or None, why it cannot be used). A model mismatch is reported, not raised, so the page can say it."""
    from rvl.retrieval import EmbeddingIndex, IndexMismatchError

    if path is None:
        return None, None
    try:
        index = EmbeddingIndex.load(path, model_fingerprint=fingerprint, dim=dim)
    except IndexMismatchError as err:
        logger.error("%s index unusable: %s", kind, err)
        return None, str(err)
    if index.model_fingerprint is None:
        logger.warning("index %s records no model fingerprint: cannot check that it was built by this model", path)
    found = index.extra.get("kind", "study")
    if found != kind:
        raise ValueError(f"{path} is a {found} index; expected a {kind} index (rvl index build --kind {kind})")
    if kind == "report" and not any(c in index.metadata for c in CHEXPERT_LABELS):
        raise ValueError(f"{path}: the report index has no CheXpert label columns to vote with; rebuild it with "
                         "rvl index build --kind report")
    return index, None


class StudyService:
    """Model + indexes + caches; the operations of the web API.

    Args:
        model: An eval-mode :class:`rvl.model.RVLModel`.
        model_fingerprint: Its :func:`rvl.retrieval.model_fingerprint`.
        index: Study index (``rvl index build --kind study``) for similar-study and text search; ``None`` = none.
        reports_index: Report index with label columns for the kNN vote; ``None`` = prompt zero-shot only.
        index_errors: Why a given index could not be loaded (model mismatch), by ``"index"`` / ``"reports_index"``.
        cache_studies: Studies kept in the LRU cache.
        knn_k: Reports that vote in kNN zero-shot.
        max_images / max_upload_bytes: Upload limits per study.
    """

    def __init__(self, model: Any, model_fingerprint: str, index: Any = None, reports_index: Any = None,
                 index_errors: dict[str, str] | None = None, cache_studies: int = 64, knn_k: int = 20,
                 max_images: int = 4, max_upload_bytes: int = 100 << 20, model_name: str = "model"):
        from rvl.zeroshot import ZeroShotClassifier

        self.model = model
        self.model_fingerprint = model_fingerprint
        self.model_name = model_name
        self.index = index
        self.reports_index = reports_index
        self.index_errors = dict(index_errors or {})
        self.knn_k = knn_k
        self.max_images = max_images
        self.max_upload_bytes = max_upload_bytes
        self.max_views = int(getattr(model, "rvl_cfg", {}).get("max_views", 2))
        self._model_lock = threading.Lock()  # one forward pass at a time: on a few CPU cores more only thrash
        self.studies = LRUCache(cache_studies)
        self._prompts = LRUCache(256)
        self.classifier = ZeroShotClassifier.from_model(model)
        self._study_rows: dict[str, int] = {}
        if index is not None and "study_id" in index.metadata:
            ids = index.metadata.index.to_numpy()
            for study_id, index_id in zip(index.metadata["study_id"].astype(str), ids):
                self._study_rows.setdefault(study_id, int(index_id))

    @classmethod
    def load(cls, model_dir: str | Path, index_dir: str | Path | None = None,
             reports_index_dir: str | Path | None = None, device: str | None = None, **kwargs: Any) -> "StudyService":
        """Load the model folder and index folders once (refusing indexes of another kind; see :func:`_load_index`)."""
        from rvl.retrieval.embed import load_model, model_fingerprint

        fingerprint = model_fingerprint(model_dir)
        model = load_model(model_dir, device)
        index, index_error = _load_index(index_dir, "study", fingerprint, model.embed_dim)
        reports, reports_error = _load_index(reports_index_dir, "report", fingerprint, model.embed_dim)
        errors = {k: v for k, v in (("index", index_error), ("reports_index", reports_error)) if v}
        folder = Path(model_dir).absolute()  # rvl pretrain writes OUT/model: name it by OUT
        name = f"{folder.parent.name}/{folder.name}" if folder.name == "model" else folder.name
        return cls(model, fingerprint, index, reports, errors, model_name=name, **kwargs)

    # ------------------------------------------------------------------ status
    def health(self) -> dict[str, Any]:
        def describe(index: Any, error_key: str) -> dict[str, Any] | None:
            if index is None and error_key not in self.index_errors:
                return None
            if index is None:
                return {"loaded": False, "error": self.index_errors[error_key]}
            return {"loaded": True, "count": len(index), "dim": index.dim, "factory": index.factory,
                    "date_filters": "study_date" in index.metadata, "patient_filters": "patient_id" in index.metadata}

        return {"status": "ok", "model": {"name": self.model_name, "fingerprint": self.model_fingerprint,
                                          "embed_dim": int(self.model.embed_dim), "image_size": self.model.image_size,
                                          "max_views": self.max_views},
                "labels": list(self.classifier.labels), "index": describe(self.index, "index"),
                "reports_index": describe(self.reports_index, "reports_index"),
                "limits": {"max_images": self.max_images, "max_upload_mb": round(self.max_upload_bytes / 2**20, 1),
                           "max_k": MAX_K},
                "cached_studies": len(self.studies)}

    # ------------------------------------------------------------------ studies
    def _embed_squares(self, squares: Sequence[np.ndarray], views: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        import torch

        from rvl.retrieval.embed import model_device, study_batch

        batch = study_batch(self.model, squares, views, self.max_views)
        device = model_device(self.model)
        with self._model_lock, torch.no_grad():
            emb = self.model.encode_study(*(batch[k].to(device) for k in ("images", "view_mask", "view_types")))
        return emb.float().cpu().numpy()[0], list(batch["order"])

    def upload_study(self, files: Sequence[tuple[str, bytes]], views: Sequence[str] | None = None,
                     patient_id: str | None = None, study_date: str | None = None) -> StudyEntry:
        """Decode and embed an uploaded study (or find it in the cache by content)."""
        from rvl.data.io import to_square_uint8
        from rvl.serve.render import display_uint8
        from rvl.serve.uploads import read_uploads, upload_digest

        key = f"upload:{upload_digest(files, views)}"
        entry = self.studies.get(key)
        if entry is None:
            study = read_uploads(files, views, max_images=self.max_images, max_bytes=self.max_upload_bytes)
            squares = [to_square_uint8(im.image, self.model.image_size) for im in study.images]
            displays = [display_uint8(im.image) for im in study.images]
            embedding, used = self._embed_squares(squares, study.views)
            entry = StudyEntry(key, study.views, [im.name for im in study.images], embedding,
                               displays, squares, study.patient_id, study.study_date,
                               used_views=used)
            self.studies.put(key, entry)
            logger.info("embedded an uploaded study: %d image(s), views %s", len(squares), "/".join(study.views))
        return self._with_overrides(entry, patient_id, study_date)

    def cached_upload(self, upload_id: str, patient_id: str | None = None,
                      study_date: str | None = None) -> StudyEntry:
        entry = self.studies.get(f"upload:{upload_id}")
        if entry is None:
            raise ServiceError(f"upload {upload_id!r} is no longer cached; upload the images again", status=404)
        return self._with_overrides(entry, patient_id, study_date)

    @staticmethod
    def _with_overrides(entry: StudyEntry, patient_id: str | None, study_date: str | None) -> StudyEntry:
        patient_id = (patient_id or "").strip() or None
        date = parse_date(study_date, "study_date")
        if patient_id is None and date is None:
            return entry
        return dataclasses.replace(entry, patient_id=patient_id or entry.patient_id,
                                   study_date=date.isoformat() if date else entry.study_date)

    def _archive_row(self, study_id: str) -> tuple[int, Any]:
        index = self._require_index()
        index_id = self._study_rows.get(str(study_id))
        if index_id is None:
            raise ServiceError(f"study {study_id!r} is not in the index", status=404)
        return index_id, index.metadata.loc[index_id]

    def archive_study(self, study_id: str) -> StudyEntry:
        """An archive study by its id: its stored embedding (no model pass) and metadata; images load on demand."""
        from rvl.data.dataset import select_views
        from rvl.retrieval.search_cli import _as_list

        key = f"archive:{study_id}"
        entry = self.studies.get(key)
        if entry is None:
            index_id, row = self._archive_row(study_id)
            paths = _as_list(row["image_paths"]) if "image_paths" in row else []
            views = _as_list(row["view_positions"]) if "view_positions" in row else ["OTHER"] * len(paths)
            entry = StudyEntry(key, views, [f"view {i + 1}" for i in range(len(paths))],
                               self.index.reconstruct(np.asarray([index_id], np.int64))[0],
                               patient_id=optional_text(row.get("patient_id")),
                               study_date=optional_text(row.get("study_date")),
                               study_id=str(study_id), index_id=index_id,
                               used_views=select_views(views, self.max_views, None))
            entry.derived["paths"] = paths
            self.studies.put(key, entry)
        return entry

    def study_displays(self, entry: StudyEntry) -> list[np.ndarray]:
        """The uint8 display views of a study (read from the archive paths in the index metadata on first use)."""
        from rvl.data.io import ImageReadError, read_image, to_square_uint8
        from rvl.serve.render import display_uint8

        if entry.displays is None:
            displays, squares = [], []
            for i, path in enumerate(entry.derived.get("paths", [])):
                try:
                    image = read_image(path)
                except ImageReadError as err:
                    # the index row, not the path: archive paths often hold patient ids
                    logger.warning("archive image unreadable (index id %d, view %d): %s", entry.index_id, i, err.cause)
                    raise ServiceError(f"view {i + 1} of study {entry.study_id} cannot be read from the archive "
                                       f"({err.cause})", status=404) from None
                displays.append(display_uint8(image))
                squares.append(to_square_uint8(image, self.model.image_size))
            entry.squares, entry.displays = squares, displays
        return entry.displays

    def view_png(self, entry: StudyEntry, view: int, max_side: int = 1024) -> bytes:
        """PNG of one view at display size (cached per size)."""
        from rvl.serve.render import display_uint8, png_bytes

        if not 0 <= view < len(entry.views):
            raise ServiceError(f"study has {len(entry.views)} view(s); there is no view {view}", status=404)
        max_side = int(min(max(max_side, 32), 2048))
        cache_key = f"png:{view}:{max_side}"
        if cache_key not in entry.derived:
            entry.derived[cache_key] = png_bytes(display_uint8(self.study_displays(entry)[view], max_side))
        return entry.derived[cache_key]

    def study_record(self, study_id: str) -> dict[str, Any]:
        """An archive study's metadata (report, labels, views) as the API shows it."""
        from rvl.retrieval.search_cli import _hit

        entry = self.archive_study(study_id)
        _, row = self._archive_row(study_id)
        record = _hit(row, 1.0, 0)
        for key in ("rank", "score", "image_paths"):
            record.pop(key, None)
        return {**record, "study": entry.describe()}

    # ------------------------------------------------------------------ zero-shot and heatmaps
    def zeroshot(self, entry: StudyEntry) -> dict[str, Any]:
        """Prompt-ensemble probabilities of the 14 labels, and the kNN vote of similar reports when available."""
        from rvl.zeroshot import knn_zero_shot

        prompt = self.classifier.predict_proba(entry.embedding[None])[0]
        knn = None
        if self.reports_index is not None:
            labels = [c for c in self.classifier.labels if c in self.reports_index.metadata]
            votes = knn_zero_shot(self.reports_index, entry.embedding[None], k=min(self.knn_k, len(self.reports_index)),
                                  labels=labels)[0]
            knn = {label: round(float(p), 4) for label, p in zip(labels, votes)}
        return {"study": entry.describe(), "labels": list(self.classifier.labels),
                "prompt": {label: round(float(p), 4) for label, p in zip(self.classifier.labels, prompt)},
                "knn": knn, "knn_k": None if self.reports_index is None else min(self.knn_k, len(self.reports_index)),
                "knn_error": self.index_errors.get("reports_index")}

    def _prompt_classifier(self, prompt: str) -> Any:
        """The classifier of a CheXpert label (its packaged prompt ensemble) or of a free-text prompt (templates)."""
        from rvl.zeroshot import ZeroShotClassifier

        if prompt in self.classifier.labels:
            i = self.classifier.labels.index(prompt)
            return ZeroShotClassifier([prompt], self.classifier.positive[i:i + 1], self.classifier.negative[i:i + 1],
                                      self.classifier.logit_scale)
        cached = self._prompts.get(prompt)
        if cached is None:
            with self._model_lock:
                cached = ZeroShotClassifier.from_model(self.model, [prompt])
            self._prompts.put(prompt, cached)
        return cached

    def heatmap(self, entry: StudyEntry, prompt: str) -> dict[str, Any]:
        """Where each view matches ``prompt``: overlays (PNG data URLs) scaled jointly over the study's views."""
        from rvl.heatmap import patch_embeddings, similarity_maps
        from rvl.retrieval.embed import images_to_tensor
        from rvl.serve.render import content_map, data_url, display_uint8, overlay_png

        prompt = " ".join(str(prompt or "").split())
        if not prompt:
            raise ServiceError("empty prompt: click a finding or type a description")
        if len(prompt) > 300:
            raise ServiceError(f"the prompt has {len(prompt)} characters; at most 300")
        classifier = self._prompt_classifier(prompt)
        displays = [display_uint8(d, 512) for d in self.study_displays(entry)]
        if "patches" not in entry.derived:
            with self._model_lock:
                entry.derived["patches"] = patch_embeddings(self.model, images_to_tensor(self.model, entry.squares))
        grids = similarity_maps(entry.derived["patches"], classifier.positive[0])
        maps = [content_map(g, *d.shape) for g, d in zip(grids, displays)]
        low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
        views = []
        for i, (display, heat) in enumerate(zip(displays, maps)):
            png, (x, y) = overlay_png(display, heat, low, high)
            views.append({"index": i, "view": entry.views[i], "image": data_url(png),
                          "peak": [round(x, 4), round(y, 4)], "max_score": round(float(heat.max()), 4)})
        probability = float(classifier.predict_proba(entry.embedding[None])[0, 0])
        return {"prompt": prompt, "probability": round(probability, 4), "score_range": [round(low, 4), round(high, 4)],
                "views": views}

    # ------------------------------------------------------------------ retrieval
    def _require_index(self) -> Any:
        if self.index is None:
            if "index" in self.index_errors:
                raise ServiceError(f"similar-study search is unavailable: {self.index_errors['index']}", status=409)
            raise ServiceError("no study index loaded (start rvl serve with --index)", status=409)
        return self.index

    def _search(self, query: np.ndarray, k: int, *, patient_id: str | None = None, exclude_patient: str | None = None,
                date_from: str | None = None, date_to: str | None = None, before: dt.date | None = None,
                exclude_ids: list[int] | None = None) -> list[dict[str, Any]]:
        from rvl.data.dataset import select_views
        from rvl.model.core import report_text_for_model
        from rvl.retrieval import filter_ids
        from rvl.retrieval.search_cli import _as_list, _hit

        index = self._require_index()
        if not 1 <= int(k) <= MAX_K:
            raise ServiceError(f"k must be between 1 and {MAX_K}, got {k}")
        first, last = parse_date(date_from, "date_from"), parse_date(date_to, "date_to")
        if first and last and first > last:
            raise ServiceError(f"date range {first} .. {last} is empty (date_from after date_to)")
        # filter_ids bounds are strict; the page's range is inclusive of whole days (dates may carry times)
        bounds = [d for d in (last + dt.timedelta(days=1) if last else None, before) if d is not None]
        after = dt.datetime.combine(first, dt.time.min) - dt.timedelta(microseconds=1) if first else None
        try:
            allowed, excluded = filter_ids(index.metadata, patient_id=patient_id, exclude_patient=exclude_patient,
                                           before=min(bounds).isoformat() if bounds else None,
                                           after=after.isoformat() if after else None,
                                           exclude_ids=exclude_ids)
        except ValueError as err:
            raise ServiceError(str(err)) from None
        scores, ids = index.search(np.asarray(query, np.float32).reshape(1, -1), int(k), allowed_ids=allowed,
                                   excluded_ids=excluded)
        hits = []
        for rank, (score, index_id) in enumerate(zip(scores[0], ids[0]), start=1):
            if index_id < 0:
                continue
            row = index.metadata.loc[int(index_id)]
            hit = _hit(row, score, rank)
            hit.pop("image_paths", None)  # archive paths stay on the server; images are served by study id
            if hit.get("report"):
                hit["summary"] = report_text_for_model(hit["report"])  # findings + impression, for the result card
            views = _as_list(row["view_positions"]) if "view_positions" in row else []
            if hit.get("study_id") is not None:
                first_view = select_views(views, 1, None)[0] if views else 0
                hit["thumbnail"] = f"/api/study/{quote(hit['study_id'], safe='')}/image/{first_view}"
            hit["views"] = views
            hits.append(hit)
        return hits

    def similar(self, entry: StudyEntry, k: int = DEFAULT_K, exclude_patient: bool = False, priors_only: bool = False,
                date_from: str | None = None, date_to: str | None = None) -> dict[str, Any]:
        """The ``k`` archive studies most similar to ``entry`` (never itself), with patient / date filters."""
        if exclude_patient and priors_only:
            raise ServiceError("choose either 'exclude this patient' or 'only this patient's priors', not both")
        if (exclude_patient or priors_only) and not entry.patient_id:
            raise ServiceError("this study has no patient id (no DICOM PatientID): enter one to use patient filters")
        before = None
        if priors_only:
            before = parse_date(entry.study_date, "study date")
            if before is None:
                raise ServiceError("this study has no date (no DICOM StudyDate): enter one to find earlier studies")
        hits = self._search(entry.embedding, k, patient_id=entry.patient_id if priors_only else None,
                            exclude_patient=entry.patient_id if exclude_patient else None, date_from=date_from,
                            date_to=date_to, before=before,
                            exclude_ids=[entry.index_id] if entry.index_id is not None else None)
        return {"study": entry.describe(), "results": hits,
                "filters": {"k": k, "exclude_patient": exclude_patient, "priors_only": priors_only,
                            "date_from": date_from or None, "date_to": date_to or None}}

    def search_text(self, text: str, k: int = DEFAULT_K, date_from: str | None = None, date_to: str | None = None,
                    patient_id: str | None = None) -> dict[str, Any]:
        """Archive studies whose fused image embedding best matches a text query."""
        from rvl.retrieval.embed import embed_texts

        text = " ".join(str(text or "").split())
        if not text:
            raise ServiceError("empty query: type a description, e.g. 'large right pleural effusion'")
        if len(text) > 1000:
            raise ServiceError(f"the query has {len(text)} characters; at most 1000")
        self._require_index()
        with self._model_lock:
            query = embed_texts(self.model, [text])[0]
        hits = self._search(query, k, patient_id=(patient_id or "").strip() or None, date_from=date_from,
                            date_to=date_to)
        return {"text": text, "results": hits, "filters": {"k": k, "date_from": date_from or None,
                                                           "date_to": date_to or None}}

