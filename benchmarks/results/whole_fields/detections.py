"""What counted detections hold: each field of a bench-fields pool matched to its annotation. Usage (repo root):
    python benchmarks/results/whole_fields/detections.py test 0.05 /tmp/out.json
One row per field, then the totals over the fields counted: found (one red cell), none (no annotated cell),
multi (several), wbc (a white cell only), and of each how many were called Parasitized."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from edge.field import FieldOptions, analyze  # noqa: E402
from edge.operating import field_point, operating_point  # noqa: E402
from edge.runtime import load_classifier  # noqa: E402
from train.fieldpool import patient_crops, pool_fields  # noqa: E402
from train.fieldscore import contains  # noqa: E402

split, pi, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
model = load_classifier(Path("models/mobilenetv2/mobilenetv2_int8.tflite"))
opts = FieldOptions.at(operating_point(model, field_point(model)))
rows = []
patients = patient_crops(Path("data/prepared"), Path("../shared/data/nih_malaria_dev"), split)
for g, j, f in pool_fields(patients, pi, 3, 1000):  # bench-fields' pool: 3 fields a patient group, seeds 1000+
    res = analyze(f.rgb, f"{g}#{j}", model, opts)
    n = dict.fromkeys(("found", "found_pos", "found_inf", "none", "none_pos", "multi", "multi_pos", "multi_inf",
                       "wbc", "wbc_pos"), 0)
    for c, call in zip(res.detection.cells, res.cells):
        if call.prob_parasitized is None:
            continue
        inside = [t for t in f.truth if contains(c, t.x, t.y)]
        red = [t for t in inside if t.label != "White_Blood_Cell"]
        called = int(call.prob_parasitized >= opts.threshold)
        if len(red) == 1 and len(inside) == 1:
            n["found"] += 1
            n["found_pos"] += called
            n["found_inf"] += red[0].label == "Parasitized"
        elif not red:
            key = "wbc" if inside else "none"
            n[key] += 1
            n[key + "_pos"] += called
        else:
            n["multi"] += 1
            n["multi_pos"] += called
            n["multi_inf"] += any(t.label == "Parasitized" for t in red)
    rows.append(dict(group=g, status=res.status, rbc=res.rbc, positive=res.positive, true_red=len(f.red_cells),
                     true_inf=sum(t.label == "Parasitized" for t in f.red_cells), **n))
    print(rows[-1], flush=True)
Path(out).write_text(json.dumps(rows))
counted = [r for r in rows if r["status"] == "ok"]
print(json.dumps({key: sum(r[key] for r in counted) for key in rows[0] if key not in ("group", "status")}))
