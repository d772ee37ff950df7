"""The adapter layer between the workflow and the library: one module per stage, one
function per ``python -m pipeline`` verb (:mod:`pipeline.cli` builds the options from the
signatures). These functions read files, call library functions with objects and write the
results; the library below never sees a path it has to parse."""
