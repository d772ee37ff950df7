# Adaptive model merging (AdaMerging) workflow. Stages live in workflow/rules/*.smk.
from snakemake.utils import min_version

min_version("8.0")


# The demo config, unless --configfile names others: those replace it instead of being
# merged into it, so no demo setting leaks into another configuration.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


wildcard_constraints:
    task="|".join(ALL_TASKS),
    method="|".join(MERGE_METHODS),


include: "workflow/rules/zoo.smk"
include: "workflow/rules/task_vectors.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/adamerging.smk"
include: "workflow/rules/test_time.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/report.smk"


# Local runs fork their jobs from one warm process (pipeline/job_server.py).
onstart:
    start_job_server()


rule all:
    default_target: True
    input:
        final_outputs(),
