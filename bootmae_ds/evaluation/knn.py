"""A weighted k-NN classifier on frozen encoder features: the cheap yardstick of representation
quality (k=20, cosine similarity, votes weighted by exp(sim / 0.07), as DINO evaluates).

Features are the mean of the encoder's normalised patch tokens (``pooled_tokens``). Images are
resized (shorter side to ``img_size / crop_pct``) and centre-cropped (``bootmae_ds.data.labelled``).
``KnnMonitor`` is the in-training monitor (rank 0, a limited bank held in memory);
``launchers/knn.py`` evaluates whole sets (e.g. all of ImageNet's training images as the bank)
with every rank extracting its share (``bootmae_ds.evaluation.features``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import BootMAEConfig
from ..data.labelled import load_images, open_eval_source


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, images: torch.Tensor, mean: tuple[float, ...],
                     std: tuple[float, ...], batch_size: int = 256, block: int | None = None) -> torch.Tensor:
    """Mean-pooled patch tokens ``[N, D]`` (fp32) after block ``block`` (1-based) or, by default,
    after the final norm; computed in the encoder's device and dtype."""
    param = next(encoder.parameters())
    m = torch.tensor(mean, device=param.device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=param.device).view(1, 3, 1, 1) * 255
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = ((images[start: start + batch_size].to(param.device).float() - m) / s).to(param.dtype)
        if block is None:
            tokens = encoder.forward_features(x)  # [B, 1+N, D]
        else:
            tokens = encoder(x, None, return_blocks=(block - 1,)).block_outputs[block - 1]
        out.append(tokens[:, 1:].float().mean(dim=1).cpu())
    encoder.train(was_training)
    return torch.cat(out)


def pooled_tokens(encoder: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised images -> the mean of the encoder's normalised patch tokens ``[B, D]`` (fp32)."""
    return lambda x: encoder.forward_features(x)[:, 1:].float().mean(dim=1)


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``[Nq, C]`` of the weighted k-NN vote (cosine similarity)."""
    num_classes = num_classes or int(bank_labels.max()) + 1
    k = min(k, len(bank))
    bank = F.normalize(bank.float(), dim=1)
    chunk = max(1, min(chunk, 2**28 // max(len(bank), 1)))  # similarity blocks of at most 1 GiB
    scores = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start: start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [q, k]
        votes = torch.zeros(len(q), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor, *, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Top-1 and top-5 accuracy (in %) of the weighted k-NN classifier."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    scores = knn_predict(bank, bank_labels, queries, k=k, temperature=temperature, num_classes=num_classes)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hits = top == query_labels[:, None]
    return {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(dim=1).float().mean().item()}


class KnnMonitor:
    """Loads a labelled bank and query set once; scores an encoder on them when called."""

    def __init__(self, cfg: BootMAEConfig, bank: str, queries: str, bank_limit: int | None,
                 query_limit: int | None, k: int = 20, temperature: float = 0.07) -> None:
        size = cfg.model.img_size
        crop = cfg.logging.knn_crop_pct  # type: ignore[attr-defined]
        self.bank = load_images(open_eval_source(bank, cfg), size, bank_limit, crop)
        self.queries = load_images(open_eval_source(queries, cfg), size, query_limit, crop)
        self.mean, self.std, self.k, self.temperature = cfg.data.mean, cfg.data.std, k, temperature

    def __call__(self, encoder: torch.nn.Module) -> dict[str, float]:
        bank = extract_features(encoder, self.bank.images, self.mean, self.std)
        queries = extract_features(encoder, self.queries.images, self.mean, self.std)
        return knn_accuracy(bank, self.bank.labels, queries, self.queries.labels, k=self.k,
                            temperature=self.temperature)
