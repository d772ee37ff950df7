"""``python -m pipeline VERB``: the command line every workflow job runs."""

import os
import sys

# open_clip imports Hugging Face transformers whenever it is installed (0.7 s of every job's
# start-up, measured), only for Hugging Face text towers, which the supported architectures
# do not have. PIPELINE_IMPORT_TRANSFORMERS=1 keeps the import for an architecture that needs it.
if os.environ.get("PIPELINE_IMPORT_TRANSFORMERS") != "1":
    sys.modules.setdefault("transformers", None)

from pipeline.cli import main

main()
