# Merge stage: one merged image encoder per method. Task-vector methods stream the zarr store;
# Task Arithmetic and TIES choose lambda on the validation split; Fisher merging and RegMean
# read the fine-tuned encoders and training examples; multi-task learning trains jointly.

MERGE_CODE = [
    "merging/__init__.py",
    "store/task_vectors.py",
    "store/streaming.py",
    "models/checkpoints.py",
]


rule merge_weight_averaging:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        store=task_vectors(TASKS),
    output:
        model=f"{RESULTS}/merges/weight_averaging/model.safetensors",
        settings=f"{RESULTS}/merges/weight_averaging/model.json",
    log:
        f"{LOGS}/merge/weight_averaging.log",
    benchmark:
        f"{BENCH}/merge/weight_averaging.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        zoo=zoo_json(),
        budget=config["merging"]["budget_mib"],
        code=code_version(*MERGE_CODE, "merging/weight_averaging.py"),
    shell:
        "python -m pipeline merge --zoo {params.zoo:q} --method weight_averaging "
        "--pretrained {input.pretrained} --task-vectors {input.store} "
        "--budget-mib {params.budget} --out {output.model} --threads {threads} > {log} 2>&1"


rule lambda_search:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        store=task_vectors(TASKS),
        heads=heads(TASKS),
        data=task_data(TASKS),
    output:
        model=f"{RESULTS}/merges/{{method}}/model.safetensors",
        settings=f"{RESULTS}/merges/{{method}}/model.json",
        search=f"{RESULTS}/lambda_search/{{method}}.parquet",
    log:
        f"{LOGS}/merge/{{method}}.log",
    benchmark:
        f"{BENCH}/merge/{{method}}.tsv"
    wildcard_constraints:
        method="|".join(SEARCH_METHODS),
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        zoo=zoo_json(),
        settings=lambda wc: merge_settings(wc.method),
        grid=json.dumps(config["merging"]["lambda_grid"], sort_keys=True),
        batch=config["evaluation"]["batch_size"],
        code=lambda wc: code_version(
            *MERGE_CODE,
            f"merging/{wc.method}.py",
            "merging/lambda_search.py",
            "evaluation.py",
        ),
    shell:
        "python -m pipeline lambda-search --zoo {params.zoo:q} --method {wildcards.method} "
        "--pretrained {input.pretrained} --task-vectors {input.store} "
        "--heads {input.heads} --data {input.data} --settings {params.settings:q} "
        "--grid {params.grid:q} --batch-size {params.batch} --search-out {output.search} "
        "--out {output.model} --threads {threads} > {log} 2>&1"


rule task_negation:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        store=f"{STORE}/{{task}}",
    output:
        model=f"{RESULTS}/merges/task_negation/{{task}}/model.safetensors",
        settings=f"{RESULTS}/merges/task_negation/{{task}}/model.json",
    log:
        f"{LOGS}/merge/task_negation_{{task}}.log",
    benchmark:
        f"{BENCH}/merge/task_negation_{{task}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        zoo=zoo_json(),
        settings=json.dumps({"lam": config["merging"]["task_negation"]["lam"]}),
        budget=config["merging"]["budget_mib"],
        code=code_version(
            *MERGE_CODE, "merging/task_negation.py", "merging/task_arithmetic.py"
        ),
    shell:
        "python -m pipeline merge --zoo {params.zoo:q} --method task_negation "
        "--pretrained {input.pretrained} --task-vectors {input.store} "
        "--settings {params.settings:q} --budget-mib {params.budget} --out {output.model} "
        "--threads {threads} > {log} 2>&1"


rule merge_with_data:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        finetuned=finetuned(TASKS),
        heads=heads(TASKS),
        data=task_data(TASKS),
    output:
        model=f"{RESULTS}/merges/{{method}}/model.safetensors",
        settings=f"{RESULTS}/merges/{{method}}/model.json",
    log:
        f"{LOGS}/merge/{{method}}.log",
    benchmark:
        f"{BENCH}/merge/{{method}}.tsv"
    wildcard_constraints:
        method="|".join(DATA_METHODS),
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=6000,
        runtime=60,
    params:
        zoo=zoo_json(),
        tasks=TASKS,
        settings=lambda wc: merge_settings(wc.method),
        code=lambda wc: code_version(
            "merging/__init__.py", f"merging/{wc.method}.py", "data/tasks.py"
        ),
    shell:
        "python -m pipeline merge-with-data --zoo {params.zoo:q} --method {wildcards.method} "
        "--pretrained {input.pretrained} --finetuned {input.finetuned} --tasks {params.tasks} "
        "--heads {input.heads} --data {input.data} --settings {params.settings:q} "
        "--out {output.model} --threads {threads} > {log} 2>&1"


if SOURCE == "synthetic":

    rule multitask:
        input:
            pretrained=f"{MODELS}/pretrained.safetensors",
            heads=heads(TASKS),
            data=task_data(TASKS),
        output:
            model=f"{RESULTS}/merges/multitask/model.safetensors",
            settings=f"{RESULTS}/merges/multitask/model.json",
        log:
            f"{LOGS}/merge/multitask.log",
        benchmark:
            f"{BENCH}/merge/multitask.tsv"
        priority: 10
        conda:
            ENV
        threads: THREADS
        resources:
            mem_mb=4000,
            runtime=60,
        params:
            zoo=zoo_json("synthetic.finetune"),
            tasks=TASKS,
            code=code_version(
                "merging/__init__.py", "merging/multitask.py", "zoo/synthetic_zoo.py"
            ),
        shell:
            "python -m pipeline multitask --zoo {params.zoo:q} --pretrained {input.pretrained} "
            "--tasks {params.tasks} --heads {input.heads} --data {input.data} "
            "--out {output.model} --threads {threads} > {log} 2>&1"
