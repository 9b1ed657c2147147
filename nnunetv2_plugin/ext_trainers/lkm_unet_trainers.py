"""The folder `lkm-unet trainer-path` prints, for nnU-Net's ``nnUNet_extTrainer``.

nnU-Net imports every module here as a top-level module and then forgets the folder, so this file
only re-exports the trainers from the installed package.
"""
from nnunetv2_plugin.lkm_unet_trainer import (  # noqa: F401
    LKMUNetTrainer,
    LKMUNetTrainer_1epoch,
    LKMUNetTrainer_5epochs,
    LKMUNetTrainer_10epochs,
    LKMUNetTrainer_50epochs,
    LKMUNetTrainer_100epochs,
    LKMUNetTrainer_250epochs,
    LKMUNetTrainer_demo,
    LKMUNetTrainer_noBiM,
    LKMUNetTrainer_noMamba,
    LKMUNetTrainer_noPaM,
    LKMUNetTrainer_noPiM,
    LKMUNetTrainerNoAMP,
    LKMUNetTrainerNoDeepSupervision,
    nnUNetTrainerLKMUNet,
)
