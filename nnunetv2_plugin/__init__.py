"""nnU-Net v2 glue for LKM-UNet: trainers, plans helpers, dataset converters and evaluation."""
