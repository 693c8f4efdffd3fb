"""``python -m structsparse run RECIPE.yaml --out DIR``."""
import sys

from .cli import main

sys.exit(main())
