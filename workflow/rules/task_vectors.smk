# Task-vector store: one zarr subgroup per task (fine-tuned minus pretrained), written atomically.


rule task_vector:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        finetuned=f"{MODELS}/finetuned/{{task}}.safetensors",
    output:
        directory(f"{STORE}/{{task}}"),
    log:
        f"{LOGS}/task_vector/{{task}}.log",
    benchmark:
        f"{BENCH}/task_vector/{{task}}.tsv"
    priority: 25
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        zoo=zoo_json(),
        chunk_mib=config["merging"]["chunk_mib"],
        storage=json.dumps(config["merging"]["storage"], sort_keys=True),
        code=code_version("task-vector"),
    shell:
        "adamerge task-vector --zoo {params.zoo:q} --task {wildcards.task:q} "
        "--pretrained {input.pretrained:q} --finetuned {input.finetuned:q} "
        "--chunk-mib {params.chunk_mib:q} --storage {params.storage:q} --out {output:q} --threads {threads} > {log:q} 2>&1"
