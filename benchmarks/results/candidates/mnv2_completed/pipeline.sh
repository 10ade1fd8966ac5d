set -e
cd /work/main
R=/tmp/scratch/ct/run1
malaria-edge train --recipe mobilenetv2-finetune --weights none --alpha 0.75 --augment stain --init $R/model.keras --epochs 0 --finetune-epochs 0 --data data/prepared --out $R
malaria-edge export $R/model.keras --data data/prepared --out $R/export --formats tflite-int8 --parity-split val --no-explainer --name mnv2_completed
malaria-edge evaluate $R/export/mnv2_completed_int8.tflite --operating-points --screen models/cnn_s2/cnn_s2_int8.tflite --update-card
cd /tmp/scratch/wt
python -m malaria_edge evaluate $R/export/mnv2_completed_int8.tflite --field-spread --update-card --crops /work/shared/data/nih_malaria_dev
echo PIPELINE DONE
