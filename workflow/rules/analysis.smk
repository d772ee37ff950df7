# Analysis stage (the paper's analyses): each rule writes a parquet table and a figure (PNG),
# which the report embeds. Config `analysis` (every section optional, `enabled` by default).

from pipeline.analysis.corruptions import CORRUPTIONS

ROBUST_TASKS = list(analysis_cfg("robustness")["tasks"] or TASKS[:4])
UNSEEN_TASKS = list(analysis_cfg("unseen")["tasks"] or TASKS[-2:])
SEEN_TASKS = [t for t in TASKS if t not in UNSEEN_TASKS]
UNSEEN_ALL = SEEN_TASKS + UNSEEN_TASKS
UNSEEN_VARIANTS = analysis_cfg("unseen")["variants"]
SENSITIVITY_METHODS = sensitivity_methods()


# the test curve of each method: its merge and a test evaluation per lambda, run as soon as the
# task vectors exist (the validation curves come with the lambda searches)
rule analysis_sensitivity_test:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        store=task_vectors(TASKS),
        heads=heads(TASKS),
        data=task_data(TASKS, "test"),
    output:
        f"{AN}/sensitivity/{{method}}_test.parquet",
    log:
        f"{LOGS}/analysis/sensitivity_{{method}}_test.log",
    benchmark:
        f"{BENCH}/analysis/sensitivity_{{method}}_test.tsv"
    wildcard_constraints:
        method="|".join(SENSITIVITY_METHODS),
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        budget=config["merging"]["budget_mib"],
        data=data_args(TASKS),
        zoo=zoo_json(),
        settings=lambda wc: merge_settings(wc.method),
        grid=LAMBDA_GRID,
        batch=config["evaluation"]["batch_size"],
        code=lambda wc: code_version("analysis-sensitivity-test", wc.method),
    shell:
        "adamerge analysis-sensitivity-test --zoo {params.zoo:q} --method {wildcards.method:q} "
        "--pretrained {input.pretrained:q} --task-vectors {input.store:q} --heads {input.heads:q} "
        "--data {params.data:q} --settings {params.settings:q} --grid {params.grid:q} "
        "--batch-size {params.batch:q} --budget-mib {params.budget:q} --out {output:q} "
        "--threads {threads} > {log:q} 2>&1"


rule analysis_sensitivity:
    input:
        search=expand(f"{RESULTS}/lambda_search/{{m}}.parquet", m=SENSITIVITY_METHODS),
        test=(
            expand(f"{AN}/sensitivity/{{m}}_test.parquet", m=SENSITIVITY_METHODS)
            if analysis_cfg("sensitivity")["test"]
            else []
        ),
        references=[
            f"{RESULTS}/eval/adamerging_{v}.parquet" for v in ADAMERGING_VARIANTS
        ]
        + ([f"{RESULTS}/eval/multitask.parquet"] if SOURCE == "synthetic" else []),
    output:
        table=f"{AN}/sensitivity.parquet",
        figure=report(
            f"{AN}/sensitivity.png",
            category="Analysis",
            caption="../report/sensitivity.rst",
        ),
    log:
        f"{LOGS}/analysis/sensitivity.log",
    benchmark:
        f"{BENCH}/analysis/sensitivity.tsv"
    priority: 10
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        test=lambda wc, input: ["--test-curves", *input.test] if input.test else [],
        code=code_version("analysis-sensitivity"),
    shell:
        "adamerge analysis-sensitivity --search {input.search:q} {params.test:q} "
        "--references {input.references:q} --out {output.table:q} --figure {output.figure:q} "
        "--threads {threads} > {log:q} 2>&1"


rule analysis_coefficients:
    input:
        lambdas=expand(
            f"{RESULTS}/adamerging/{{v}}/lambdas.parquet", v=ADAMERGING_VARIANTS
        ),
        entropy=expand(
            f"{RESULTS}/adamerging/{{v}}/entropy.parquet", v=ADAMERGING_VARIANTS
        ),
    output:
        table=f"{AN}/coefficients.parquet",
        layer=report(
            f"{AN}/coefficients_layer_wise.png",
            category="Analysis",
            caption="../report/coefficients.rst",
        ),
        task=report(
            f"{AN}/coefficients_task_wise.png",
            category="Analysis",
            caption="../report/coefficients.rst",
        ),
        entropy=report(
            f"{AN}/entropy_curves.png",
            category="Analysis",
            caption="../report/entropy_curves.rst",
        ),
    log:
        f"{LOGS}/analysis/coefficients.log",
    benchmark:
        f"{BENCH}/analysis/coefficients.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("analysis-coefficients"),
    shell:
        "adamerge analysis-coefficients --lambdas {input.lambdas:q} "
        "--entropy {input.entropy:q} --out {output.table:q} --layer-figure {output.layer:q} "
        "--task-figure {output.task:q} --entropy-figure {output.entropy:q} > {log:q} 2>&1"


DISTANCE_MODELS = {
    f"finetuned_{t}": f"{MODELS}/finetuned/{t}.safetensors" for t in TASKS
} | MERGED_MODELS


rule analysis_distances:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        models=list(DISTANCE_MODELS.values()),
        store=task_vectors(TASKS),
    output:
        table=f"{AN}/distances.parquet",
        figure=report(
            f"{AN}/distances.png",
            category="Analysis",
            caption="../report/distances.rst",
        ),
        cosine=f"{AN}/cosine.parquet",
        cosine_figure=report(
            f"{AN}/cosine.png",
            category="Analysis",
            caption="../report/distances.rst",
        ),
    log:
        f"{LOGS}/analysis/distances.log",
    benchmark:
        f"{BENCH}/analysis/distances.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        zoo=zoo_json(),
        models=[f"{k}={v}" for k, v in DISTANCE_MODELS.items()],
        code=code_version("analysis-distances"),
    shell:
        "adamerge analysis-distances --zoo {params.zoo:q} --pretrained {input.pretrained:q} "
        "--models {params.models:q} --task-vectors {input.store:q} --out {output.table:q} "
        "--figure {output.figure:q} --cosine-out {output.cosine:q} "
        "--cosine-figure {output.cosine_figure:q} > {log:q} 2>&1"


rule analysis_surrogate:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        store=task_vectors(TASKS),
        heads=heads(TASKS),
        data=task_data(TASKS),
    output:
        samples=f"{AN}/entropy_loss.parquet",
        spearman=f"{AN}/entropy_spearman.parquet",
        figure=report(
            f"{AN}/entropy_loss.png",
            category="Analysis",
            caption="../report/surrogate.rst",
        ),
    log:
        f"{LOGS}/analysis/surrogate.log",
    benchmark:
        f"{BENCH}/analysis/surrogate.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        budget=config["merging"]["budget_mib"],
        data=data_args(TASKS),
        zoo=zoo_json(),
        lambdas=analysis_cfg("surrogate")["lambdas"],
        max_samples=analysis_cfg("surrogate")["max_samples"],
        batch=config["evaluation"]["batch_size"],
        code=code_version("analysis-surrogate"),
    shell:
        "adamerge analysis-surrogate --budget-mib {params.budget:q} --zoo {params.zoo:q} --pretrained {input.pretrained:q} "
        "--task-vectors {input.store:q} --heads {input.heads:q} --data {params.data:q} "
        "--lambdas {params.lambdas:q} --max-samples {params.max_samples:q} --batch-size {params.batch:q} "
        "--out {output.samples:q} --spearman-out {output.spearman:q} --figure {output.figure:q} "
        "--threads {threads} > {log:q} 2>&1"


rule analysis_robustness_run:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        store=task_vectors(ROBUST_TASKS),
        finetuned=finetuned(ROBUST_TASKS),
        heads=heads(ROBUST_TASKS),
        data=task_data(ROBUST_TASKS),
    output:
        f"{AN}/robustness/{{corruption}}.parquet",
    log:
        f"{LOGS}/analysis/robustness_{{corruption}}.log",
    benchmark:
        f"{BENCH}/analysis/robustness_{{corruption}}.tsv"
    wildcard_constraints:
        corruption="|".join(["clean", *CORRUPTIONS]),
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=ADAMERGING["gpus"],
    params:
        budget=config["merging"]["budget_mib"],
        data=data_args(ROBUST_TASKS),
        zoo=zoo_json(),
        severity=analysis_cfg("robustness")["severity"],
        variant=analysis_cfg("robustness")["variant"],
        adamerging=adamerging_settings("robustness"),
        lambdas=merge_lambdas("robustness"),
        ties=merge_settings("ties_merging"),
        max_images=analysis_max_images("robustness"),
        batch=config["evaluation"]["batch_size"],
        code=code_version("analysis-robustness"),
    shell:
        "adamerge analysis-robustness --budget-mib {params.budget:q} --zoo {params.zoo:q} --pretrained {input.pretrained:q} "
        "--task-vectors {input.store:q} --finetuned {input.finetuned:q} --heads {input.heads:q} "
        "--data {params.data:q} --corruption {wildcards.corruption:q} --severity {params.severity:q} "
        "--variant {params.variant:q} --adamerging {params.adamerging:q} --lambdas {params.lambdas:q} "
        "--ties {params.ties:q} --max-images {params.max_images:q} --batch-size {params.batch:q} "
        "--out {output:q} --threads {threads} > {log:q} 2>&1"


rule analysis_robustness:
    input:
        expand(
            f"{AN}/robustness/{{c}}.parquet",
            c=["clean"] + analysis_cfg("robustness")["corruptions"],
        ),
    output:
        table=f"{AN}/robustness.parquet",
        figure=report(
            f"{AN}/robustness.png",
            category="Analysis",
            caption="../report/robustness.rst",
        ),
    log:
        f"{LOGS}/analysis/robustness.log",
    benchmark:
        f"{BENCH}/analysis/robustness.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("analysis-robustness-table"),
    shell:
        "adamerge analysis-robustness-table --inputs {input:q} "
        "--out {output.table:q} --figure {output.figure:q} > {log:q} 2>&1"


rule analysis_unseen_run:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        store=task_vectors(SEEN_TASKS),
        finetuned=finetuned(SEEN_TASKS),
        heads=heads(UNSEEN_ALL),
        data=task_data(UNSEEN_ALL),
    output:
        f"{AN}/unseen/{{approach}}.parquet",
    log:
        f"{LOGS}/analysis/unseen_{{approach}}.log",
    benchmark:
        f"{BENCH}/analysis/unseen_{{approach}}.tsv"
    wildcard_constraints:
        approach="|".join(["baselines"] + ADAMERGING_VARIANTS),
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=lambda wc: 0 if wc.approach == "baselines" else ADAMERGING["gpus"],
    params:
        budget=config["merging"]["budget_mib"],
        data=data_args(UNSEEN_ALL),
        zoo=zoo_json(),
        seen=SEEN_TASKS,
        unseen=UNSEEN_TASKS,
        tasks=UNSEEN_ALL,
        adamerging=adamerging_settings("unseen"),
        lambdas=merge_lambdas("unseen"),
        ties=merge_settings("ties_merging"),
        max_images=analysis_max_images("unseen"),
        batch=config["evaluation"]["batch_size"],
        code=code_version("analysis-unseen"),
    shell:
        "adamerge analysis-unseen --budget-mib {params.budget:q} --zoo {params.zoo:q} --variant {wildcards.approach:q} "
        "--pretrained {input.pretrained:q} --task-vectors {input.store:q} --finetuned {input.finetuned:q} "
        "--heads {input.heads:q} --data {params.data:q} --tasks {params.tasks:q} --seen {params.seen:q} "
        "--unseen {params.unseen:q} --adamerging {params.adamerging:q} --lambdas {params.lambdas:q} "
        "--ties {params.ties:q} --max-images {params.max_images:q} --batch-size {params.batch:q} "
        "--out {output:q} --threads {threads} > {log:q} 2>&1"


rule analysis_unseen:
    input:
        expand(f"{AN}/unseen/{{a}}.parquet", a=["baselines"] + UNSEEN_VARIANTS),
    output:
        table=f"{AN}/unseen.parquet",
        figure=report(
            f"{AN}/unseen.png",
            category="Analysis",
            caption="../report/unseen.rst",
        ),
    log:
        f"{LOGS}/analysis/unseen.log",
    benchmark:
        f"{BENCH}/analysis/unseen.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("analysis-unseen-table"),
    shell:
        "adamerge analysis-unseen-table --inputs {input:q} "
        "--out {output.table:q} --figure {output.figure:q} > {log:q} 2>&1"


# LoRA modules (the PEM composition analysis) are fine-tuned on the synthetic zoo only.
if SYNTHETIC:

    rule lora_finetune:
        input:
            pretrained=f"{MODELS}/pretrained.safetensors",
            head=f"{MODELS}/heads/{{task}}.safetensors",
            data=f"{DATA}/{{task}}.npz",
        output:
            f"{MODELS}/lora/{{task}}.safetensors",
        log:
            f"{LOGS}/lora_finetune/{{task}}.log",
        benchmark:
            f"{BENCH}/lora_finetune/{{task}}.tsv"
        priority: 20
        conda:
            ENV
        threads: THREADS
        resources:
            mem_mb=4000,
            runtime=60,
        params:
            zoo=zoo_json("synthetic.finetune"),
            settings=json.dumps(analysis_cfg("pem")["lora"], sort_keys=True),
            code=code_version("lora-finetune"),
        shell:
            "adamerge lora-finetune --zoo {params.zoo:q} --task {wildcards.task:q} "
            "--pretrained {input.pretrained:q} --head {input.head:q} --data {input.data:q} "
            "--settings {params.settings:q} --out {output:q} --threads {threads} > {log:q} 2>&1"

    # the LoRA rows: a job of their own, which runs as soon as the LoRA modules exist
    rule analysis_pem_lora:
        input:
            pretrained=f"{MODELS}/pretrained.safetensors",
            lora=expand(f"{MODELS}/lora/{{t}}.safetensors", t=TASKS),
            heads=heads(TASKS),
            data=task_data(TASKS, "test", "val"),
        output:
            f"{AN}/pem_lora.parquet",
        log:
            f"{LOGS}/analysis/pem_lora.log",
        benchmark:
            f"{BENCH}/analysis/pem_lora.tsv"
        priority: 20
        conda:
            ENV
        threads: THREADS
        resources:
            mem_mb=8000,
            runtime=120,
        params:
            data=data_args(TASKS),
            zoo=zoo_json(),
            tasks=TASKS,
            grid=LAMBDA_GRID,
            negation=config["merging"]["task_negation"]["lam"],
            adamerging=adamerging_settings("pem"),
            max_images=analysis_max_images("pem"),
            batch=config["evaluation"]["batch_size"],
            code=code_version("analysis-pem-lora"),
        shell:
            "adamerge analysis-pem-lora --zoo {params.zoo:q} --pretrained {input.pretrained:q} "
            "--tasks {params.tasks:q} --lora {input.lora:q} "
            "--heads {input.heads:q} --data {params.data:q} --grid {params.grid:q} "
            "--negation-lam {params.negation:q} --adamerging {params.adamerging:q} "
            "--max-images {params.max_images:q} --batch-size {params.batch:q} "
            "--out {output:q} --threads {threads} > {log:q} 2>&1"

    # the full fine-tuning rows: the main table's evaluations if it ran the same compositions,
    # else computed from the fine-tuned models
    PEM_FULL = pem_main_files() or {"finetuned": finetuned(TASKS)}

    rule analysis_pem:
        input:
            **PEM_FULL,
            pretrained=f"{MODELS}/pretrained.safetensors",
            lora_rows=f"{AN}/pem_lora.parquet",
            heads=heads(TASKS),
            data=task_data(TASKS, "test", "val"),
        output:
            table=f"{AN}/pem.parquet",
            figure=report(
                f"{AN}/pem.png", category="Analysis", caption="../report/pem.rst"
            ),
        log:
            f"{LOGS}/analysis/pem.log",
        benchmark:
            f"{BENCH}/analysis/pem.tsv"
        priority: 20
        conda:
            ENV
        threads: THREADS
        resources:
            mem_mb=8000,
            runtime=120,
        params:
            data=data_args(TASKS),
            zoo=zoo_json(),
            tasks=TASKS,
            grid=LAMBDA_GRID,
            negation=config["merging"]["task_negation"]["lam"],
            adamerging=adamerging_settings("pem"),
            max_images=analysis_max_images("pem"),
            batch=config["evaluation"]["batch_size"],
            full=option_args(PEM_FULL),
            code=code_version("analysis-pem"),
        shell:
            "adamerge analysis-pem --zoo {params.zoo:q} --pretrained {input.pretrained:q} "
            "--tasks {params.tasks:q} {params.full:q} --lora-rows {input.lora_rows:q} "
            "--heads {input.heads:q} --data {params.data:q} --grid {params.grid:q} "
            "--negation-lam {params.negation:q} --adamerging {params.adamerging:q} "
            "--max-images {params.max_images:q} --batch-size {params.batch:q} "
            "--out {output.table:q} --figure {output.figure:q} --threads {threads} > {log:q} 2>&1"
