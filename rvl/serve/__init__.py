"""``rvl serve``: a local web page and JSON API over a model and its archive index.

Upload a study (DICOM / PNG / JPEG views), read its 14 CheXpert zero-shot probabilities (prompt ensembles and the kNN
vote of similar reports), map any finding or free-text prompt onto each view, and browse the most similar archive
studies (with patient and date filters) or the studies best matching a text query.

Modules: :mod:`~rvl.serve.uploads` (reading uploaded files inside a temporary folder), :mod:`~rvl.serve.render`
(PNG renderings and heatmap overlays), :mod:`~rvl.serve.studies` (cached studies, the LRU cache, request errors),
:mod:`~rvl.serve.service` (model, indexes and the study cache; the in-process API), :mod:`~rvl.serve.schemas`
(response shapes for the OpenAPI schema), :mod:`~rvl.serve.app` (the FastAPI application), :mod:`~rvl.serve.cli`
(the command). The page (``static/``) is plain HTML/JS/CSS that calls only the JSON API. Nothing here is imported by
``import rvl``.
"""
