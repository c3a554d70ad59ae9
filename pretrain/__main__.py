import sys

from pretrain.run import cli

sys.exit(cli())
