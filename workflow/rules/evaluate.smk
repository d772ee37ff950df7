# Evaluation stage: top-1 accuracy of each model on each task's test split, into parquet.


rule evaluate_zeroshot:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        heads=heads(ALL_TASKS),
        data=task_data(ALL_TASKS),
    output:
        f"{RESULTS}/eval/zeroshot.parquet",
    log:
        f"{LOGS}/evaluate/zeroshot.log",
    benchmark:
        f"{BENCH}/evaluate/zeroshot.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        data=data_args(ALL_TASKS),
        zoo=zoo_json(),
        tasks=ALL_TASKS,
        batch=config["evaluation"]["batch_size"],
        code=code_version("evaluate"),
    shell:
        "adamerge evaluate --zoo {params.zoo:q} --model zeroshot --method zeroshot "
        "--pretrained {input.pretrained:q} --tasks {params.tasks:q} --heads {input.heads:q} "
        "--data {params.data:q} --batch-size {params.batch:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


rule evaluate_individual:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        encoder=f"{MODELS}/finetuned/{{task}}.safetensors",
        head=f"{MODELS}/heads/{{task}}.safetensors",
        data=task_data(["{task}"]),
    output:
        f"{RESULTS}/eval/individual/{{task}}.parquet",
    log:
        f"{LOGS}/evaluate/individual_{{task}}.log",
    benchmark:
        f"{BENCH}/evaluate/individual_{{task}}.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        data=lambda wc: data_args([wc.task]),
        zoo=zoo_json(),
        batch=config["evaluation"]["batch_size"],
        code=code_version("evaluate"),
    shell:
        "adamerge evaluate --zoo {params.zoo:q} --model individual --method individual "
        "--pretrained {input.pretrained:q} --encoder {input.encoder:q} --tasks {wildcards.task:q} "
        "--heads {input.head:q} --data {params.data:q} --batch-size {params.batch:q} --out {output:q} "
        "--threads {threads} > {log:q} 2>&1"


rule evaluate_merged:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        encoder=f"{RESULTS}/merges/{{method}}/model.safetensors",
        heads=heads(TASKS),
        data=task_data(TASKS),
    output:
        f"{RESULTS}/eval/{{method}}.parquet",
    log:
        f"{LOGS}/evaluate/{{method}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{method}}.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        data=data_args(TASKS),
        zoo=zoo_json(),
        tasks=TASKS,
        batch=config["evaluation"]["batch_size"],
        code=lambda wc: code_version(  # a routed method's route is its module's code
            "evaluate", *([wc.method] if registry.method(wc.method).route else [])
        ),
    shell:
        "adamerge evaluate --zoo {params.zoo:q} --model {wildcards.method:q} "
        "--method {wildcards.method:q} --pretrained {input.pretrained:q} --encoder {input.encoder:q} "
        "--tasks {params.tasks:q} --heads {input.heads:q} --data {params.data:q} --batch-size {params.batch:q} "
        "--out {output:q} --threads {threads} > {log:q} 2>&1"


rule evaluate_negation:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        encoder=f"{RESULTS}/merges/task_negation/{{task}}/model.safetensors",
        heads=heads(TASKS),
        data=task_data(TASKS),
    output:
        f"{RESULTS}/eval/task_negation/{{task}}.parquet",
    log:
        f"{LOGS}/evaluate/task_negation_{{task}}.log",
    benchmark:
        f"{BENCH}/evaluate/task_negation_{{task}}.tsv"
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        data=data_args(TASKS),
        zoo=zoo_json(),
        tasks=TASKS,
        batch=config["evaluation"]["batch_size"],
        code=code_version("evaluate"),
    shell:
        "adamerge evaluate --zoo {params.zoo:q} --model task_negation_{wildcards.task:q} "
        "--method task_negation --pretrained {input.pretrained:q} --encoder {input.encoder:q} "
        "--tasks {params.tasks:q} --heads {input.heads:q} --data {params.data:q} --batch-size {params.batch:q} "
        "--out {output:q} --threads {threads} > {log:q} 2>&1"
