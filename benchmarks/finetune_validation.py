"""Choose fine-tuning settings on a validation split inside Jurkat's training part (the test split is not used).

The benchmark's split (stratified 80/20, seed 0) is split again: train_test_split(train, 0.2, stratify,
random_state=1). Each variant is FinetuneConfig fields on top of the values below, run on the SSL-pretrained
SimCLR model (``ssl``, from ``bench_images.py``'s run directory) or on a randomly initialised copy of its
architecture (``scratch``). The augmentation is FinetuneConfig's default (flips, 90-degree turns) unless a
variant sets ``augment``. Each fine-tuned model is scored plainly and with test-time augmentation. Results and
the variants run: benchmarks/results/images_jurkat_validation.md.

    python benchmarks/finetune_validation.py '{"name": ["ssl", {"head": "full", "encoder_lr_factor": 1.0}]}'
"""
import json
import sys
import time
from pathlib import Path

import torch
from sklearn.model_selection import train_test_split

import sslcell
from sslcell import tl
from sslcell.classify import FinetuneConfig, finetune
from sslcell.config import load_config
from sslcell.data.images import CellImages
from sslcell.methods import build_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_images import DATA, split  # noqa: E402

cells = CellImages.read(DATA / "jurkat_cellcycle_ifc_mlcp.npz", channels=[0, 2])
train, test = split(cells, "stratified", 0)
y = cells.obs["label"].astype(str).to_numpy()
tr, val = train_test_split(train, test_size=0.2, stratify=y[train], random_state=1)
model = sslcell.load(Path(sys.argv[2] if len(sys.argv) > 2 else "bench_runs/jurkat/jurkat_simclr"))
config = load_config(Path(__file__).resolve().parent / "configs" / "jurkat_simclr.yaml")
torch.manual_seed(0)
untrained = build_method(config, model.inputs.contract)
variants = json.loads(sys.argv[1])
for name, (which, values) in variants.items():
    cfg = FinetuneConfig.from_dict({"epochs": 20, "batch_size": 128, "lr": 5e-4, "dropout": 0.2, "progress_bar": False,
                                    **values})
    t0 = time.time()
    clf = finetune(cells[tr], model if which == "ssl" else untrained, "label", cfg)
    for tta in (False, True):  # plain, and averaged over the 8 flips and 90-degree turns
        adata = cells[val].to_anndata()
        tl.predict(adata, clf, crops=cells[val], tta=tta)
        rep = tl.score(adata, "label")
        print(f"VAL {name} tta={tta}: accuracy {rep.accuracy:.3f} macro-F1 {rep.macro_f1:.3f} "
              f"bal {rep.balanced_accuracy:.3f} ({time.time()-t0:.0f}s)", flush=True)
