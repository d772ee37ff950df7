# Merge stage: one merged image encoder per method from all tasks' fine-tuned encoders.


rule merge:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        finetuned=finetuned(TASKS),
    output:
        model=f"{RESULTS}/merges/{{method}}/model.safetensors",
        settings=f"{RESULTS}/merges/{{method}}/model.json",
    log:
        f"{LOGS}/merge/{{method}}.log",
    benchmark:
        f"{BENCH}/merge/{{method}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        zoo=zoo_json(),
        tasks=TASKS,
        settings=lambda wc: json.dumps(
            {"lam": config["evaluation"]["task_arithmetic_lambda"]}
            if wc.method == "task_arithmetic"
            else {}
        ),
        code=lambda wc: code_version("merging/__init__.py", f"merging/{wc.method}.py"),
    shell:
        "python -m pipeline merge --zoo {params.zoo:q} --method {wildcards.method} "
        "--pretrained {input.pretrained} --finetuned {input.finetuned} --tasks {params.tasks} "
        "--settings {params.settings:q} --out {output.model} > {log} 2>&1"
