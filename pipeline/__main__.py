"""``python -m pipeline VERB``: the command line every workflow job runs (``adamerge VERB``)."""

from pipeline.cli import main

main()
