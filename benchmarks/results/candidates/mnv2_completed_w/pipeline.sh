set -e
R=/tmp/scratch/cw/run1
cd /work/main  # run from a worktree of 44e2a8e
python /tmp/scratch/cw/train_weighted.py $R 2500 2500 1 1e-4 > /tmp/scratch/cw/train.log 2>&1
python -m malaria_edge train --recipe mobilenetv2-finetune --weights none --alpha 0.75 --augment stain --init $R/model.keras --epochs 0 --finetune-epochs 0 --data data/prepared --out $R
python -m malaria_edge export $R/model.keras --data data/prepared --out $R/export --formats tflite-int8 --parity-split val --no-explainer --name mnv2_completed_w
python -m malaria_edge evaluate $R/export/mnv2_completed_w_int8.tflite --operating-points --screen models/cnn_s2/cnn_s2_int8.tflite --update-card
python -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c['field_crops']={'complete_overlap': 0.067}; json.dump(c, open(p,'w'), indent=2)" $R/export/mnv2_completed_w_int8.tflite.card.json
python -m malaria_edge evaluate $R/export/mnv2_completed_w_int8.tflite --field-spread --update-card --crops /work/shared/data/nih_malaria_dev
echo PIPELINE DONE
python -m malaria_edge bench-fields --model $R/export/mnv2_completed_w_int8.tflite --split val --crops /work/shared/data/nih_malaria_dev --fields /work/shared/data/nih_fields/239C12NThinF --out /tmp/scratch/cw/fields_val
echo BENCH DONE
