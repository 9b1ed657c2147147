"""Convert the AMOS22 MR cases to Dataset702_AbdomenMR; same as `lkm-unet convert-amos22 ...`."""
import sys

from nnunetv2_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-amos22", *sys.argv[1:]]))
