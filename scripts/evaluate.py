"""DSC and NSD of a prediction folder; same as `lkm-unet evaluate ...`."""
import sys

from nnunetv2_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
