"""Evidence about LKM-UNet: same-budget comparisons, parameter/FLOP profiles, effective receptive fields."""
