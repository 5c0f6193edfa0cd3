"""Response shapes of the JSON API (pydantic), so that its OpenAPI schema documents what each route returns."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field


class View(BaseModel):
    index: int
    view: str = Field(description="PA, AP, LATERAL, LL or OTHER")
    name: str = Field(description="the uploaded file's name, or 'view N' for archive studies")
    image: str = Field(description="URL of the rendered view (PNG; send the token with it)")
    in_study_embedding: bool = Field(description="whether this view is one of the model's max_views fused views")


class Study(BaseModel):
    key: str = Field(description="cache key: 'upload:<upload_id>' or 'archive:<study_id>'")
    upload_id: Optional[str] = Field(None, description="pass it instead of re-uploading the files")
    study_id: Optional[str] = None
    patient_id: Optional[str] = None
    study_date: Optional[str] = None
    views: list[View]


class ZeroShot(BaseModel):
    study: Study
    labels: list[str]
    prompt: dict[str, float] = Field(description="prompt-ensemble probability per label")
    knn: Optional[dict[str, float]] = Field(None, description="similarity-weighted vote of the k nearest reports")
    knn_k: Optional[int] = None
    knn_error: Optional[str] = Field(None, description="why the report index is unusable (e.g. another model)")


class HeatmapView(BaseModel):
    index: int
    view: str
    image: str = Field(description="PNG data URL: the view with the heatmap over it and its peak marked")
    peak: list[float] = Field(description="normalised (x, y) of the maximum")
    max_score: float


class Heatmap(BaseModel):
    prompt: str
    probability: float = Field(description="zero-shot probability of the prompt for the study")
    score_range: list[float] = Field(description="patch scores mapped to the colour scale, shared by the views")
    views: list[HeatmapView]


class Hit(BaseModel):
    rank: int
    score: float = Field(description="cosine similarity")
    study_id: Optional[str] = None
    patient_id: Optional[str] = None
    study_date: Optional[str] = None
    split: Optional[str] = None
    report: Optional[str] = None
    summary: Optional[str] = Field(None, description="the report's findings and impression (whole report if none)")
    labels: Optional[dict[str, float]] = None
    views: list[str] = []
    thumbnail: Optional[str] = Field(None, description="URL of the study's first (frontal) view")


class Similar(BaseModel):
    study: Study
    results: list[Hit]
    filters: dict[str, object]


class TextSearch(BaseModel):
    text: str
    results: list[Hit]
    filters: dict[str, object]


class SearchRequest(BaseModel):
    text: str = Field(description="e.g. 'large right pleural effusion with rib fracture'", max_length=1000)
    k: int = Field(8, ge=1, le=100)
    date_from: Optional[str] = Field(None, description="YYYY-MM-DD, inclusive")
    date_to: Optional[str] = Field(None, description="YYYY-MM-DD, inclusive")
    patient_id: Optional[str] = Field(None, description="only this patient's studies")


class StudyRecord(BaseModel):
    study_id: Optional[str] = None
    patient_id: Optional[str] = None
    study_date: Optional[str] = None
    split: Optional[str] = None
    report: Optional[str] = None
    labels: Optional[dict[str, float]] = None
    study: Study


class Error(BaseModel):
    detail: str
