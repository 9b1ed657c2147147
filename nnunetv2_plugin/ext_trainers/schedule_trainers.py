"""Re-exports the schedule variants (``nnUNetTrainer_demo``, ``LKMUNetTrainer_noMamba_5epochs``, ...) for
nnU-Net's trainer lookup through ``nnUNet_extTrainer``; see nnunetv2_plugin.schedule_trainers."""
from nnunetv2_plugin.schedule_trainers import *  # noqa: F401,F403
