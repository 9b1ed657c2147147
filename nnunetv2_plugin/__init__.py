"""nnU-Net v2 glue for LKM-UNet: trainers, plans helpers, dataset converters and evaluation."""

# The plans identifier `lkm-unet plans` writes by default (beside nnU-Net's nnUNetPlans.json).
DEFAULT_LKM_PLANS = "nnUNetLKMUNetPlans"
