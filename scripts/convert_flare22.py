"""Convert FLARE22 to Dataset701_AbdomenCT; same as `lkm-unet convert-flare22 ...`."""
import sys

from nnunetv2_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-flare22", *sys.argv[1:]]))
