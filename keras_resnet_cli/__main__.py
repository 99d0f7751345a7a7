"""`python -m keras_resnet_cli ...`: the same as `keras-resnet ...`."""

import sys

from keras_resnet_cli import main

sys.exit(main())
