"""What the nnU-Net export tests (test_nnunet_export.py, test_export.py) export and expect back."""

CHANNELS = ["pre", "post"]
CLASSES = ["background", "breast", "lesion"]
# dataset.json after one case exported with CHANNELS and CLASSES, every voxel trusted (so no "ignore" label).
ONE_CASE_DATASET_JSON = {
    "channel_names": {"0": "pre", "1": "post"},
    "labels": {"background": 0, "breast": 1, "lesion": 2},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}
