"""Fine-tune the shipped MobileNetV2 on NIH train crops plus a sample of field mode's completed crops of train-patient fields."""
import sys, json
sys.path.insert(0, "/work/main")
from pathlib import Path
import numpy as np
from train.data import load_prepared, Prepared
from train.train import TrainConfig, train

out, n_pos, n_neg, epochs, lr = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
d = load_prepared("/work/main/data/prepared")
z = np.load("/tmp/scratch/ct/completed_train.npz")
rng = np.random.default_rng(0)
pos = np.flatnonzero(z["y"] == 1); neg = np.flatnonzero(z["y"] == 0)
neg = rng.choice(neg, min(n_neg, len(neg)), replace=False)
pos = rng.choice(pos, min(n_pos, len(pos)), replace=False)
sel = np.sort(np.concatenate([pos, neg]))
x = np.concatenate([np.asarray(d.images), z["x"][sel]])
y = np.concatenate([d.labels, z["y"][sel]])
splits = np.concatenate([d.splits, np.array(["train"] * len(sel))])
print(f"completed crops: {len(pos)} infected, {len(neg)} uninfected; train total {np.sum(splits=='train')}", flush=True)
data = Prepared(d.root, x, y, d.relpaths + [f"completed/{i}" for i in sel], d.groups + list(z["g"][sel]), splits, d.split_info)
cfg = TrainConfig(recipe="mobilenetv2-finetune", epochs=epochs, finetune_epochs=0, lr=lr, alpha=0.75,
                  augment="stain", init="/work/main/models/mobilenetv2/mobilenetv2.keras", patience=3, verbose=2,
                  workers=2)
model, info = train(data, cfg, out)
(out / "train_info.json").write_text(json.dumps(info, indent=1))
