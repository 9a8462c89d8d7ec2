"""``python -m llama_np`` runs the ``llama-np`` command line."""

import sys

from llama_np.cli.main import main

sys.exit(main())
