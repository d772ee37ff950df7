# Zoo stage: the pretrained CLIP, one zero-shot head and one fine-tuned image encoder per task.
# Synthetic zoos are built here; real zoos are imported from open_clip and checkpoint files.

if SOURCE == "synthetic":

    rule task_data:
        output:
            f"{DATA}/{{task}}.npz",
        log:
            f"{LOGS}/task_data/{{task}}.log",
        benchmark:
            f"{BENCH}/task_data/{{task}}.tsv"
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        params:
            zoo=zoo_json("synthetic.sizes", "synthetic.domains"),
            code=code_version("task-data"),
        shell:
            "adamerge task-data --zoo {params.zoo:q} --task {wildcards.task} "
            "--out {output} --threads {threads} > {log} 2>&1"

    rule pretrain:
        output:
            model=f"{MODELS}/pretrained.safetensors",
            tokenizer=f"{MODELS}/tokenizer.json",
        log:
            f"{LOGS}/pretrain.log",
        benchmark:
            f"{BENCH}/pretrain/pretrain.tsv"
        conda:
            ENV
        # the one long job at the start of the DAG, beside only the task-data jobs
        threads: max(THREADS, 2)
        resources:
            mem_mb=4000,
            runtime=60,
        params:
            zoo=zoo_json("synthetic.pretrain"),
            code=code_version("pretrain"),
        shell:
            "adamerge pretrain --zoo {params.zoo:q} --out {output.model} "
            "--tokenizer {output.tokenizer} --threads {threads} > {log} 2>&1"

    rule finetune:
        input:
            pretrained=f"{MODELS}/pretrained.safetensors",
            head=f"{MODELS}/heads/{{task}}.safetensors",
            data=f"{DATA}/{{task}}.npz",
        output:
            f"{MODELS}/finetuned/{{task}}.safetensors",
        log:
            f"{LOGS}/finetune/{{task}}.log",
        benchmark:
            f"{BENCH}/finetune/{{task}}.tsv"
        priority: 30
        conda:
            ENV
        threads: THREADS
        resources:
            mem_mb=3000,
            runtime=30,
        params:
            zoo=zoo_json("synthetic.finetune"),
            code=code_version("finetune"),
        shell:
            "adamerge finetune --zoo {params.zoo:q} --task {wildcards.task} "
            "--pretrained {input.pretrained} --head {input.head} --data {input.data} "
            "--out {output} --threads {threads} > {log} 2>&1"

else:

    rule import_pretrained:
        output:
            f"{MODELS}/pretrained.safetensors",
        log:
            f"{LOGS}/import_pretrained.log",
        benchmark:
            f"{BENCH}/import_pretrained/import_pretrained.tsv"
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=8000,
            runtime=30,
        params:
            zoo=zoo_json(),
            code=code_version("import-pretrained"),
        shell:
            "adamerge import-pretrained --zoo {params.zoo:q} --out {output} > {log} 2>&1"

    rule import_finetuned:
        input:
            pretrained=f"{MODELS}/pretrained.safetensors",
        output:
            f"{MODELS}/finetuned/{{task}}.safetensors",
        log:
            f"{LOGS}/import_finetuned/{{task}}.log",
        benchmark:
            f"{BENCH}/import_finetuned/{{task}}.tsv"
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=8000,
            runtime=30,
        params:
            zoo=zoo_json(),
            code=code_version("import-finetuned"),
        shell:
            "adamerge import-finetuned --zoo {params.zoo:q} --task {wildcards.task} "
            "--pretrained {input.pretrained} --out {output} > {log} 2>&1"


rule zero_shot_head:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
    output:
        f"{MODELS}/heads/{{task}}.safetensors",
    log:
        f"{LOGS}/zero_shot_head/{{task}}.log",
    benchmark:
        f"{BENCH}/zero_shot_head/{{task}}.tsv"
    priority: 30
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        zoo=zoo_json(),
        code=code_version("head"),
    shell:
        "adamerge head --zoo {params.zoo:q} --task {wildcards.task} "
        "--pretrained {input.pretrained} --out {output} > {log} 2>&1"
