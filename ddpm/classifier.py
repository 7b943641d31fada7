"""A small CNN that reads a slice's z-bin and lesion presence: the judge of generated slices.

Condition faithfulness asks whether a slice generated for token (z_bin, pathology) looks
like a real slice of that bin and class. A classifier trained on the real training slices
answers it: its accuracy on generated slices, next to its accuracy on real held-out slices,
says how much of the conditioning the generator honours. Its penultimate features also
serve as the embedding for KID (Binkowski et al. 2018), in place of an ImageNet network
that knows nothing of FLAIR slices.

The classifier sees the image channel only: with the mask channel, lesion presence would be
read off the generated mask instead of the generated anatomy.

Trained once per cache and cached as ``classifier.pt`` beside the checkpoint, keyed by the
cache's settings hash and the training settings below; a changed key retrains it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

CLASSIFIER_VERSION = 1
CLASSIFIER_FILE = "classifier.pt"


@dataclass(frozen=True)
class ClassifierSettings:
    """How the classifier is trained (part of its cache key)."""

    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 16  # channels of the first conv block; doubled at each of the 3 blocks
    feature_dim: int = 128  # size of the penultimate features (the KID embedding)
    seed: int = 0


class SliceClassifier(nn.Module):
    """Three conv blocks -> 4x4 pooled map -> features -> z-bin logits and a lesion logit."""

    def __init__(self, n_bins: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        self.n_bins = n_bins
        blocks, ch = [], 1
        for k in range(3):
            out = width * 2**k
            blocks += [nn.Conv2d(ch, out, 3, padding=1), nn.GroupNorm(min(8, out), out),
                       nn.SiLU(), nn.Conv2d(out, out, 3, padding=1), nn.SiLU(),
                       nn.MaxPool2d(2)]
            ch = out
        self.body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(ch * 16, feature_dim), nn.SiLU())
        self.z_head = nn.Linear(feature_dim, n_bins)
        self.lesion_head = nn.Linear(feature_dim, 1)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (B, 1, H, W) in [-1, 1]."""
        return self.embed(self.body(image))

    def forward(self, image: torch.Tensor):
        """(z-bin logits (B, n_bins), lesion logit (B,)) for images (B, 1, H, W)."""
        f = self.features(image)
        return self.z_head(f), self.lesion_head(f)[:, 0]


def train_classifier(images: torch.Tensor, z_bins: torch.Tensor, pathology: torch.Tensor,
                     n_bins: int, settings: ClassifierSettings = ClassifierSettings(),
                     device="cpu", progress: bool = True) -> SliceClassifier:
    """Fit a :class:`SliceClassifier` on images (N, 1, H, W), seeded, with Adam.

    Loss: cross-entropy on the z-bin plus binary cross-entropy on lesion presence, the
    lesion term weighted by healthy/lesion so the rare class counts as much as the common one.
    """
    torch.manual_seed(settings.seed)
    model = SliceClassifier(n_bins, settings.width, settings.feature_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n_lesion = int(pathology.sum())
    pos_weight = torch.tensor((len(pathology) - n_lesion) / max(n_lesion, 1), device=device)
    g = torch.Generator().manual_seed(settings.seed)
    model.train()
    for _ in tqdm(range(settings.epochs), desc="training classifier", unit="epoch",
                  disable=not progress):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(order), settings.batch_size):
            pick = order[start:start + settings.batch_size]
            x = images[pick].to(device).float()
            z_logits, lesion_logit = model(x)
            loss = F.cross_entropy(z_logits, z_bins[pick].to(device)) + \
                F.binary_cross_entropy_with_logits(lesion_logit, pathology[pick].float().to(device),
                                                   pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.inference_mode()
def classify(model: SliceClassifier, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Predictions for images (N, 1, H, W): ``z_bin`` (N,), ``lesion_prob`` (N,), ``features``."""
    device = next(model.parameters()).device
    model.eval()
    z, lesion, feats = [], [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float()
        f = model.features(x)
        z.append(model.z_head(f).argmax(1).cpu())
        lesion.append(torch.sigmoid(model.lesion_head(f)[:, 0]).cpu())
        feats.append(f.cpu())
    return {"z_bin": torch.cat(z), "lesion_prob": torch.cat(lesion),
            "features": torch.cat(feats).double()}


def condition_accuracy(predicted: dict, z_bins, pathology) -> dict:
    """Exact z-bin accuracy, within-one-bin accuracy and lesion accuracy (threshold 0.5)."""
    z_bins, pathology = torch.as_tensor(z_bins).long(), torch.as_tensor(pathology).long()
    if len(z_bins) == 0:
        return {"n": 0, "z_exact": float("nan"), "z_within1": float("nan"),
                "lesion": float("nan")}
    off = (predicted["z_bin"] - z_bins).abs()
    lesion = (predicted["lesion_prob"] > 0.5).long()
    return {"n": len(z_bins), "z_exact": float((off == 0).double().mean()),
            "z_within1": float((off <= 1).double().mean()),
            "lesion": float((lesion == pathology).double().mean())}


def _key(meta: dict, settings: ClassifierSettings) -> dict:
    return {"version": CLASSIFIER_VERSION, "cache_settings_hash": str(meta["settings_hash"]),
            "n_bins": int(meta["n_bins"]), "image_size": int(meta["image_size"]),
            "settings": asdict(settings)}


def load_or_train(folder, meta: dict, train_images, train_z, train_pathology,
                  settings: ClassifierSettings = ClassifierSettings(), device="cpu",
                  progress: bool = True) -> tuple[SliceClassifier, bool]:
    """The classifier cached in ``folder/classifier.pt`` if its key matches, else a new one.

    Returns (model, trained_now). A new classifier is written atomically to the same file.
    ``train_images`` may be a callable returning the images, so they load only when needed.
    """
    path = Path(folder) / CLASSIFIER_FILE
    key = _key(meta, settings)
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # unreadable: treat as absent and replace it
            stored = None
        if isinstance(stored, dict) and stored.get("key") == key:
            model = SliceClassifier(key["n_bins"], settings.width, settings.feature_dim)
            model.load_state_dict(stored["model"])
            return model.to(device).eval(), False
    images = train_images() if callable(train_images) else train_images
    model = train_classifier(images, torch.as_tensor(train_z), torch.as_tensor(train_pathology),
                             key["n_bins"], settings, device, progress)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"key": key, "model": {k: v.cpu() for k, v in model.state_dict().items()}},
                       f)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return model, True


def image_channel(x) -> torch.Tensor:
    """The image channel (N, 1, H, W) float32 of slices (N, 2, H, W) (tensor or array)."""
    return torch.as_tensor(np.asarray(x[:, :1], dtype=np.float32))
