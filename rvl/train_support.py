"""Support code of the ``rvl pretrain`` loop (``rvl/train.py``): seeded data order, checkpoints, validation.

Kept apart so that ``rvl/train.py`` reads top to bottom as the training loop itself.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from rvl.fileio import raise_if_disk_full, replace_dir
from rvl.integrity import IntegrityError, read_checksums, require_intact, write_checksums

CHECKPOINT_PREFIX = "step_"


# ---------------------------------------------------------------------------------------------------- data helpers
class EpochSampler:
    """Shuffles ``range(n)`` with a generator seeded by (seed, epoch): the order never depends on RNG history."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        if not self.shuffle:
            return iter(range(self.n))
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=rng).tolist())


class SeededStudies:
    """Wraps a study dataset so that item ``i`` of epoch ``e`` is drawn under its own seed (crops, view choice, and
    the report sentence when ``sentence_sampler`` is given: the item then carries ``sentence``, str or None)."""

    def __init__(self, dataset: Any, seed: int, sentence_sampler: Any = None):
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.sentence_sampler = sentence_sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            item = self.dataset[index]
            if self.sentence_sampler is not None:
                item["sentence"] = self.sentence_sampler.sample(item["report"])
            return item


class Collate:
    """collate_studies + text tokens for the text tower; picklable for workers.

    The text of a study is its report (findings + impression), or the sampled sentence when the item has one. The
    batch gets ``text_labels`` (the study labels, or the sentence's own labels) and ``text_is_sentence``.
    """

    def __init__(self, tokenize, sentence_sampler: Any = None):
        self.tokenize, self.sentence_sampler = tokenize, sentence_sampler

    def __call__(self, items: list[dict]) -> dict:
        import torch

        from rvl.data import collate_studies

        sentences = [item.pop("sentence", None) for item in items]
        batch = collate_studies(items)
        is_sentence = [s is not None for s in sentences]
        batch["text"] = self.tokenize([s if s is not None else r for s, r in zip(sentences, batch["report"])])
        batch["text_is_sentence"] = torch.tensor(is_sentence, dtype=torch.bool)
        batch["text_labels"] = batch["labels"].clone()
        if any(is_sentence):
            rows = [i for i, flag in enumerate(is_sentence) if flag]
            values = self.sentence_sampler.label([sentences[i] for i in rows])
            batch["text_labels"][rows] = torch.from_numpy(values).to(batch["text_labels"].dtype)
        return batch


# ---------------------------------------------------------------------------------------------------- checkpoints
class TrainState:
    """Counters saved with ``accelerator.save_state`` (registered for checkpointing)."""

    def __init__(self):
        self.step, self.micro_step, self.best_metric = 0, 0, -math.inf
        self.start_spread: dict[str, float] = {}  # embedding spread before the first step (collapse reference)

    def state_dict(self) -> dict[str, float]:
        return {"step": self.step, "micro_step": self.micro_step, "best_metric": self.best_metric,
                **{f"start_{k}": v for k, v in self.start_spread.items()}}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])
        self.best_metric = float(state["best_metric"])
        self.start_spread = {k[len("start_"):]: float(v) for k, v in state.items() if k.startswith("start_")}


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ``.tmp-*`` folders are ignored)."""
    found = [p for p in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def verify_checkpoint(ckpt: Path, ckpt_dir: Path) -> None:
    """Check a checkpoint's files against its ``checksums.json`` before resuming from it.

    Raises:
        IntegrityError: a file is missing or altered, or the checkpoint has no checksums; the message says which
            earlier checkpoint a resume can fall back to once this one is removed.
    """
    earlier = [p for p in list_checkpoints(ckpt_dir) if p != ckpt]
    rebuild = (f"delete {ckpt} and rerun with --resume (continues from {earlier[-1].name})" if earlier else
               f"delete {ckpt} and rerun (no earlier checkpoint: training restarts from step 0)")
    table = read_checksums(ckpt, rebuild)
    if table is None:
        raise IntegrityError(ckpt, "checkpoint has no checksums.json (incomplete or not written by rvl)",
                             rebuild=rebuild)
    require_intact(ckpt, table, rebuild)


def save_checkpoint(accelerator, ckpt_dir: Path, name: str, keep_last: int | None) -> Path:
    """``save_state`` into a tmp folder, then an atomic rename: a kill mid-save leaves the previous one intact."""
    final, tmp = ckpt_dir / name, ckpt_dir / f".tmp-{name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)  # no half checkpoint; the previous ones are untouched
        raise_if_disk_full(ckpt_dir, err, f"checkpoint {final}")
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_checksums(tmp)  # before the swap: a complete checkpoint always carries its checksums
        replace_dir(tmp, final)  # e.g. "best": the old one is moved aside first and dropped after the swap
        for stale in ckpt_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if keep_last:
            for old_ckpt in list_checkpoints(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old_ckpt, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------- evaluation
def retrieval_recall(studies, reports, tokens, ks=(1, 5, 10)) -> dict[str, float]:
    """Study->report and report->study R@k on the validation split, as ``rvl evaluate`` scores them: a hit is the
    paired report or any report whose text tokens are identical (phantom and real reports repeat)."""
    import numpy as np

    from rvl.metrics import recall_at_k

    similarity = (studies @ reports.T).numpy()
    _, text_id = np.unique(tokens.numpy(), axis=0, return_inverse=True)
    same_text = text_id.reshape(-1)[:, None] == text_id.reshape(-1)[None, :]
    out = {f"study_to_report_{k}": v for k, v in recall_at_k(similarity, same_text, ks).items()}
    out.update({f"report_to_study_{k}": v for k, v in recall_at_k(similarity.T, same_text.T, ks).items()})
    return out


def zero_shot_auc(net, studies, labels) -> dict[str, float]:
    """AUC per label of the packaged prompt ensembles (``rvl.zeroshot``) against manifest labels (1 vs 0; blank and
    uncertain left out)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from rvl.constants import CHEXPERT_LABELS
    from rvl.zeroshot import ZeroShotClassifier

    prob = ZeroShotClassifier.from_model(net, list(CHEXPERT_LABELS)).predict_proba(studies.numpy())
    out, aucs = {}, []
    for j, name in enumerate(CHEXPERT_LABELS):
        y = labels[:, j].numpy()
        keep = (y == 1) | (y == 0)
        if keep.sum() < 2 or len(np.unique(y[keep])) < 2:
            continue
        auc = float(roc_auc_score(y[keep], prob[keep, j]))
        out[f"zeroshot/{name}_auroc"] = auc
        aucs.append(auc)
    if aucs:
        out["zeroshot_macro_auc"] = float(np.mean(aucs))
    return out


def evaluate(accelerator, model, val_dl) -> dict[str, float]:
    """Zero-shot AUC per label from pos/neg prompts and study->report R@1/5/10 on the validation split."""
    import torch

    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    studies, reports, labels, tokens = [], [], [], []
    with torch.no_grad():
        for batch in val_dl:
            with accelerator.autocast():
                s = net.encode_study(batch["images"], batch["view_mask"], batch["view_types"])
                t = net.encode_text(batch["text"])
            s, t, lab, tok = accelerator.gather_for_metrics((s.float(), t.float(), batch["labels"].float(),
                                                             batch["text"]))
            studies.append(s.cpu()), reports.append(t.cpu()), labels.append(lab.cpu()), tokens.append(tok.cpu())
    metrics: dict[str, float] = {}
    if studies:
        studies_t, reports_t, labels_t = torch.cat(studies), torch.cat(reports), torch.cat(labels)
        metrics.update(retrieval_recall(studies_t, reports_t, torch.cat(tokens), ks=(1, 5, 10)))
        metrics.update(embedding_spread(studies_t, reports_t, torch.cat(tokens)))
        metrics.update(zero_shot_auc(net, studies_t, labels_t))
    net.train(was_training)
    return metrics


def embedding_spread(studies, reports, tokens) -> dict[str, float]:
    """Mean pairwise cosine of the distinct validation reports' embeddings and of the studies' (1.0 = collapsed).

    A tower that maps every input to one point still gives a finite loss and chance-level metrics; this catches it.
    """
    import torch

    import numpy as np

    _, first_rows = np.unique(tokens.numpy(), axis=0, return_index=True)  # one row per distinct report text
    distinct = reports[torch.as_tensor(first_rows)]

    def mean_cosine(x):
        if len(x) < 2:
            return float("nan")
        x = torch.nn.functional.normalize(x.float(), dim=-1)
        sims = x @ x.T
        return float((sims.sum() - sims.diagonal().sum()) / (len(x) * (len(x) - 1)))

    return {"text_mean_cosine": mean_cosine(distinct), "study_mean_cosine": mean_cosine(studies)}


def collapse_message(metrics: dict[str, float], start: dict[str, float], ratio: float) -> str | None:
    """A sentence naming a tower whose embeddings collapsed since the start, or None.

    Collapse = the distance of the mean pairwise cosine from 1 shrank below ``ratio`` times its value before training
    (``start``, measured only where a tower is pretrained). Absolute levels say little: a general-domain encoder
    already finds all chest films alike, and a random tower starts with near-identical embeddings.
    """
    for side in ("text", "study"):
        key = f"{side}_mean_cosine"
        before, now = start.get(key, float("nan")), metrics.get(key, float("nan"))
        if before == before and now == now and (1.0 - now) < ratio * (1.0 - before):
            hint = "lower --pretrained-lr or --lock-text" if side == "text" else "lower --lr or --lock-image"
            return (f"{side} embeddings collapsed: mean pairwise cosine of the validation "
                    f"{'reports' if side == 'text' else 'studies'} went from {before:.4f} before training to "
                    f"{now:.4f} ({hint})")
    return None
