import sys

from inlaid.predictor.cli import main

sys.exit(main())
