"""Trainer modules for ``nnUNet_extTrainer`` (see lkm_unet_trainers.py)."""
