"""Field mode's crops of synthetic fields of one split's patients with overlap completion, labelled from the truth."""
import sys, time
import numpy as np
from pathlib import Path
sys.path.insert(0, "/work/main")
from edge.detect import detect, crop, DetectParams
from edge.preprocess import resize_rgb
from train.fieldpool import patient_crops, VARIANTS
from train.fieldscore import contains
from train.synthetic import SynthParams, make_field

split, n_per, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seed0 = int(sys.argv[4]) if len(sys.argv) > 4 else 50000
pad = float(sys.argv[5]) if len(sys.argv) > 5 else 0.067
LEVELS = [0.05, 0.15, 0.3]
groups = patient_crops(Path("/work/main/data/prepared"), Path("/work/shared/data/nih_malaria_dev"), split)
print(len(groups), "groups", flush=True)
X, Y, G, S, C = [], [], [], [], []
k, t0 = 0, time.time()
for g, (pos, neg) in sorted(groups.items()):
    for j in range(n_per):
        p = SynthParams(parasitemia=LEVELS[k % 3], seed=seed0 + k, **VARIANTS[(k // 3) % len(VARIANTS)])
        k += 1
        f = make_field(pos, neg, p)
        det = detect(f.rgb, DetectParams(complete_overlap=pad))
        cells = [c for c in det.cells if c.status == "ok"]
        inside = [[t for t in f.red_cells if contains(c, t.x, t.y)] for c in cells]
        owners = {}
        for c, ts in zip(cells, inside):
            for t in ts:
                owners[id(t)] = owners.get(id(t), 0) + 1
        for c, ts in zip(cells, inside):
            if len(ts) == 1 and owners[id(ts[0])] == 1:
                X.append(resize_rgb(crop(f.rgb, c), 128))
                Y.append(int(ts[0].label == "Parasitized"))
                G.append(g); S.append(c.shared); C.append(c.crop_box is not None)
    print(f"{g}: {k} fields, {len(Y)} crops, {sum(Y)} infected, {time.time()-t0:.0f}s", flush=True)
np.savez(out, x=np.stack(X), y=np.array(Y), g=np.array(G), shared=np.array(S), completed=np.array(C))
print("done", len(Y), sum(Y), flush=True)
