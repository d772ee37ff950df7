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
            "adamerge task-data --zoo {params.zoo:q} --task {wildcards.task:q} "
            "--out {output:q} --threads {threads} > {log:q} 2>&1"

    rule pretrain:
        output:
            model=f"{MODELS}/pretrained.safetensors",
            tokenizer=f"{MODELS}/tokenizer.json",
        log:
            f"{LOGS}/pretrain/pretrain.log",
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
            "adamerge pretrain --zoo {params.zoo:q} --out {output.model:q} "
            "--tokenizer {output.tokenizer:q} --threads {threads} > {log:q} 2>&1"

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
            "adamerge finetune --zoo {params.zoo:q} --task {wildcards.task:q} "
            "--pretrained {input.pretrained:q} --head {input.head:q} --data {input.data:q} "
            "--out {output:q} --threads {threads} > {log:q} 2>&1"

else:

    # Downloads run where Snakemake runs (`localrules`: cluster nodes often have no network)
    # into the Hugging Face cache; their outputs are manifests (snapshot folder, commit,
    # file checksums) that the imports read.
    localrules:
        download_pretrained,
        download_finetuned,
        download_dataset,

    rule download_pretrained:
        output:
            PRETRAINED_MANIFEST,
        log:
            f"{LOGS}/download/pretrained.log",
        benchmark:
            f"{BENCH}/download/pretrained.tsv"
        params:
            repo=lambda wc: PRETRAINED["repo"],
            revision=lambda wc: revision(PRETRAINED),
            code=code_version("download-model"),
        shell:
            "adamerge download-model --repo {params.repo:q} --revision {params.revision:q} "
            "--out {output:q} > {log:q} 2>&1"

    rule download_finetuned:
        output:
            FINETUNED_MANIFEST,
        log:
            f"{LOGS}/download/finetuned_{{task}}.log",
        benchmark:
            f"{BENCH}/download/finetuned_{{task}}.tsv"
        params:
            repo=lambda wc: fill(CHECKPOINTS["repo"], wc.task),
            revision=lambda wc: revision(CHECKPOINTS, wc.task),
            code=code_version("download-model"),
        shell:
            "adamerge download-model --repo {params.repo:q} --revision {params.revision:q} "
            "--out {output:q} > {log:q} 2>&1"

    rule download_dataset:
        output:
            DATASET_MANIFEST,
        log:
            f"{LOGS}/download/dataset_{{task}}.log",
        benchmark:
            f"{BENCH}/download/dataset_{{task}}.tsv"
        params:
            repo=lambda wc: suites.task(wc.task).dataset,
            revision=lambda wc: revision(
                ZOO_CFG["datasets"], wc.task, suites.task(wc.task).revision
            ),
            patterns=lambda wc: dataset_patterns(wc.task),
            code=code_version("download-dataset"),
        shell:
            "adamerge download-dataset --repo {params.repo:q} --revision {params.revision:q} "
            "--allow-patterns {params.patterns:q} --out {output:q} > {log:q} 2>&1"

    rule import_pretrained:
        input:
            pretrained_source(),
        output:
            model=f"{MODELS}/pretrained.safetensors",
            config=f"{MODELS}/model_config.json",
        log:
            f"{LOGS}/import_pretrained/import_pretrained.log",
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
            source=pretrained_args(),
            code=code_version("import-pretrained"),
        shell:
            "adamerge import-pretrained --zoo {params.zoo:q} {params.source:q} --out {output.model:q} "
            "> {log:q} 2>&1"

    rule import_finetuned:
        input:
            pretrained=f"{MODELS}/pretrained.safetensors",
            checkpoint=lambda wc: finetuned_source(wc.task),
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
            source=lambda wc: finetuned_args(wc.task),
            code=code_version("import-finetuned"),
        shell:
            "adamerge import-finetuned --zoo {params.zoo:q} --task {wildcards.task:q} "
            "--pretrained {input.pretrained:q} {params.source:q} --out {output:q} > {log:q} 2>&1"

    rule decode_images:
        input:
            data=lambda wc: dataset_source(wc.task),
            model_config=f"{MODELS}/model_config.json",
        output:
            directory(image_cache("{task}", "{split}")),
        log:
            f"{LOGS}/decode_images/{{task}}_{{split}}.log",
        benchmark:
            f"{BENCH}/decode_images/{{task}}_{{split}}.tsv"
        wildcard_constraints:
            split="train|val|test",
        conda:
            ENV
        threads: ZOO_CFG["images"]["workers"]
        resources:
            mem_mb=4000,
            runtime=120,
        params:
            zoo=zoo_json(),
            source=lambda wc: dataset_args(wc.task),
            max_images=lambda wc: TRAIN_EXAMPLES if wc.split == "train" else 0,
            code=code_version("decode-images"),
        shell:
            "adamerge decode-images --zoo {params.zoo:q} --task {wildcards.task:q} "
            "--split {wildcards.split:q} {params.source:q} --model-config {input.model_config:q} "
            "--max-images {params.max_images:q} --out {output:q} --threads {threads} > {log:q} 2>&1"


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
        "adamerge head --zoo {params.zoo:q} --task {wildcards.task:q} "
        "--pretrained {input.pretrained:q} --out {output:q} > {log:q} 2>&1"
