# AdaMerging stage: merging coefficients learned by entropy minimisation on the tasks'
# unlabeled test images (task-wise, layer-wise and their ++ variants on TIES parts).
# Config (optional) merging.adamerging: the fields of pipeline.merging.adamerging.Settings,
# plus max_images (test images cached per task, 0: all) and gpus (per job, for clusters).

ADAMERGING = config["merging"]["adamerging"]
ADAMERGING_JOB_KEYS = ("max_images", "gpus")


rule adamerging:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        finetuned=finetuned(TASKS),
        heads=heads(TASKS),
        data=task_data(TASKS),
    output:
        model=f"{RESULTS}/adamerging/{{variant}}/model.safetensors",
        lambdas=f"{RESULTS}/adamerging/{{variant}}/lambdas.parquet",
        entropy=f"{RESULTS}/adamerging/{{variant}}/entropy.parquet",
    log:
        f"{LOGS}/adamerging/{{variant}}.log",
    benchmark:
        f"{BENCH}/adamerging/{{variant}}.tsv"
    wildcard_constraints:
        variant="|".join(ADAMERGING_VARIANTS),
    priority: 20
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=ADAMERGING["gpus"],
    params:
        data=data_args(TASKS),
        zoo=zoo_json(),
        tasks=TASKS,
        settings=json.dumps(adamerging_method_settings(), sort_keys=True),
        max_images=ADAMERGING["max_images"],
        code=lambda wc: code_version("adamerge", f"adamerging_{wc.variant}"),
    shell:
        "adamerge adamerge --zoo {params.zoo:q} --variant {wildcards.variant:q} "
        "--pretrained {input.pretrained:q} --finetuned {input.finetuned:q} --heads {input.heads:q} "
        "--tasks {params.tasks:q} --data {params.data:q} --settings {params.settings:q} "
        "--max-images {params.max_images:q} --out {output.model:q} --lambdas {output.lambdas:q} "
        "--entropy {output.entropy:q} --threads {threads} > {log:q} 2>&1"


rule evaluate_adamerging:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        encoder=f"{RESULTS}/adamerging/{{variant}}/model.safetensors",
        heads=heads(TASKS),
        data=task_data(TASKS),
    output:
        f"{RESULTS}/eval/adamerging_{{variant}}.parquet",
    log:
        f"{LOGS}/evaluate/adamerging_{{variant}}.log",
    benchmark:
        f"{BENCH}/evaluate/adamerging_{{variant}}.tsv"
    wildcard_constraints:
        variant="|".join(ADAMERGING_VARIANTS),
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
        "adamerge evaluate --zoo {params.zoo:q} --model adamerging_{wildcards.variant:q} "
        "--method adamerging_{wildcards.variant:q} --pretrained {input.pretrained:q} --encoder {input.encoder:q} "
        "--tasks {params.tasks:q} --heads {input.heads:q} --data {params.data:q} --batch-size {params.batch:q} "
        "--out {output:q} --threads {threads} > {log:q} 2>&1"
