# Report stage: the paper's claims checked, the paper-style table, zoo-quality checks, every
# analysis (tables and embedded figures), config and stage timings.


rule report:
    input:
        evals=eval_files(),
        analysis=list(analysis_files().values()),
        merges=[f"{RESULTS}/merges/{m}/model.json" for m in MERGE_METHODS],
    output:
        markdown=report(
            f"{RESULTS}/report/report.md",
            category="Report",
            caption="../report/report.rst",
        ),
        html=report(
            f"{RESULTS}/report/report.html",
            category="Report",
            caption="../report/report.rst",
        ),
        table=f"{RESULTS}/report/accuracy_table.parquet",
    log:
        f"{LOGS}/report/report.log",
    benchmark:
        f"{BENCH}/report/report.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        zoo=zoo_json("tasks", "heldout_tasks"),
        config=lambda wc: json.dumps(config, sort_keys=True),  # a function: its {task} is no wildcard
        benchmark_dir=BENCH,
        log_dir=LOGS,  # each job's log mirrors its benchmark file and ends with its usage
        analysis=[f"{k}={v}" for k, v in analysis_files().items()],
        runs=report_runs(),
        code=code_version("report"),
    shell:
        "adamerge report --zoo {params.zoo:q} --eval {input.evals:q} --config {params.config:q} "
        "--benchmark-dir {params.benchmark_dir:q} --log-dir {params.log_dir:q} --markdown {output.markdown:q} --html {output.html:q} "
        "--table {output.table:q} --analysis {params.analysis:q} --merges {input.merges:q} "
        "--runs {params.runs:q} > {log:q} 2>&1"
