# Merge stage: one merged image encoder per method of the registry. Methods on task vectors
# stream the zarr store; Task Arithmetic and TIES choose lambda on the validation split (or,
# with merging.lambda_choice fixed, merge at their lam in merge_task_vectors); Fisher merging,
# RegMean and RegMean++ read the fine-tuned encoders and training examples; multi-task
# learning trains jointly. Every rule calls `python -m pipeline merge`.

# The searched model (and its log): the method's merge, or with a fixed lambda a by-product
# of the search that the sensitivity analysis runs for its validation curve (not evaluated).
SEARCHED, SEARCH_JOB = (
    (f"{RESULTS}/lambda_search/{{method}}", "lambda_search/{method}")
    if FIXED_LAMBDA
    else (f"{RESULTS}/merges/{{method}}/model", "merge/{method}")
)


rule merge_task_vectors:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        store=task_vectors(TASKS),
    output:
        model=f"{RESULTS}/merges/{{method}}/model.safetensors",
        settings=f"{RESULTS}/merges/{{method}}/model.json",
    log:
        f"{LOGS}/merge/{{method}}.log",
    benchmark:
        f"{BENCH}/merge/{{method}}.tsv"
    wildcard_constraints:
        method="|".join(STORE_MERGES),
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        zoo=zoo_json(),
        settings=lambda wc: merge_settings(wc.method),
        budget=config["merging"]["budget_mib"],
        code=lambda wc: code_version("merge", wc.method),
    shell:
        "adamerge merge --zoo {params.zoo:q} --method {wildcards.method:q} "
        "--pretrained {input.pretrained:q} --task-vectors {input.store:q} "
        "--settings {params.settings:q} --budget-mib {params.budget:q} --out {output.model:q} "
        "--threads {threads} > {log:q} 2>&1"


rule lambda_search:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        store=task_vectors(TASKS),
        heads=heads(TASKS),
        data=task_data(TASKS, "val"),
    output:
        model=f"{SEARCHED}.safetensors",
        settings=f"{SEARCHED}.json",
        search=f"{RESULTS}/lambda_search/{{method}}.parquet",
    log:
        f"{LOGS}/{SEARCH_JOB}.log",
    benchmark:
        f"{BENCH}/{SEARCH_JOB}.tsv"
    wildcard_constraints:
        method="|".join(SEARCH_METHODS),
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        data=data_args(TASKS),
        zoo=zoo_json(),
        settings=lambda wc: merge_settings(wc.method),
        grid=LAMBDA_GRID,
        batch=config["evaluation"]["batch_size"],
        budget=config["merging"]["budget_mib"],
        code=lambda wc: code_version("lambda-search", wc.method),
    shell:
        "adamerge lambda-search --zoo {params.zoo:q} --method {wildcards.method:q} "
        "--pretrained {input.pretrained:q} --task-vectors {input.store:q} "
        "--heads {input.heads:q} --data {params.data:q} --settings {params.settings:q} "
        "--grid {params.grid:q} --batch-size {params.batch:q} --budget-mib {params.budget:q} "
        "--search-out {output.search:q} --out {output.model:q} --threads {threads} > {log:q} 2>&1"


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
        code=code_version("merge", "task_negation"),
    shell:
        "adamerge merge --zoo {params.zoo:q} --method task_negation "
        "--pretrained {input.pretrained:q} --task-vectors {input.store:q} "
        "--settings {params.settings:q} --budget-mib {params.budget:q} --out {output.model:q} "
        "--threads {threads} > {log:q} 2>&1"


rule merge_with_data:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        finetuned=lambda wc: [] if wc.method in TRAINED else finetuned(TASKS),
        heads=heads(TASKS),
        data=task_data(TASKS, "train"),
    output:
        model=f"{RESULTS}/merges/{{method}}/model.safetensors",
        settings=f"{RESULTS}/merges/{{method}}/model.json",
    log:
        f"{LOGS}/merge/{{method}}.log",
    benchmark:
        f"{BENCH}/merge/{{method}}.tsv"
    wildcard_constraints:
        method="|".join(DATA_METHODS + TRAINED),
    priority: 10
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=6000,
        runtime=60,
    params:
        data=data_args(TASKS),
        zoo=zoo_json(),
        tasks=TASKS,
        settings=lambda wc: (
            json.dumps(ZOO_CFG["synthetic"]["finetune"], sort_keys=True)
            if wc.method in TRAINED
            else merge_settings(wc.method)
        ),
        budget=config["merging"]["budget_mib"],
        code=lambda wc: code_version("merge", wc.method),
    shell:
        "adamerge merge --zoo {params.zoo:q} --method {wildcards.method:q} "
        "--pretrained {input.pretrained:q} --finetuned {input.finetuned:q} --tasks {params.tasks:q} "
        "--heads {input.heads:q} --data {params.data:q} --settings {params.settings:q} "
        "--budget-mib {params.budget:q} --out {output.model:q} --threads {threads} > {log:q} 2>&1"
