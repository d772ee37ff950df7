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
        settings=json.dumps(
            {k: v for k, v in ADAMERGING.items() if k not in ADAMERGING_JOB_KEYS},
            sort_keys=True,
        ),
        max_images=ADAMERGING["max_images"],
        code=lambda wc: code_version("adamerge", f"adamerging_{wc.variant}"),
    shell:
        "adamerge adamerge --zoo {params.zoo:q} --variant {wildcards.variant} "
        "--pretrained {input.pretrained} --finetuned {input.finetuned} --heads {input.heads} "
        "--tasks {params.tasks} --data {params.data} --settings {params.settings:q} "
        "--max-images {params.max_images} --out {output.model} --lambdas {output.lambdas} "
        "--entropy {output.entropy} --threads {threads} > {log} 2>&1"


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
        "adamerge evaluate --zoo {params.zoo:q} --model adamerging_{wildcards.variant} "
        "--method adamerging_{wildcards.variant} --pretrained {input.pretrained} --encoder {input.encoder} "
        "--tasks {params.tasks} --heads {input.heads} --data {params.data} --batch-size {params.batch} "
        "--out {output} --threads {threads} > {log} 2>&1"
