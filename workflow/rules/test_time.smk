# Test-time successors of AdaMerging, learned on the tasks' unlabeled test images like it:
# Representation Surgery (per-task modules on the final features of a base merge) and
# WEMoE (routed MLP mixtures over the task vectors). Config merging.surgery / merging.wemoe:
# the fields of each method's Settings, plus enabled, max_images (test images per task,
# 0: all) and gpus (per job, for clusters).

TT = f"{RESULTS}/test_time"
TEST_TIME_MODEL = {
    "surgery": f"{TT}/surgery/model.json",
    "wemoe": f"{TT}/wemoe/model.safetensors",
}
SURGERY_BASE = (
    merged_model(config["merging"]["surgery"]["base"])
    if "surgery" in TEST_TIME_METHODS
    else None
)


rule surgery:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        base=SURGERY_BASE or [],
        finetuned=finetuned(TASKS),
        heads=heads(TASKS),
        data=task_data(TASKS),
    output:
        model=TEST_TIME_MODEL["surgery"],
        modules=[f"{TT}/surgery/modules/{t}.safetensors" for t in TASKS],
        summary=f"{TT}/surgery/summary.json",
        curve=f"{TT}/surgery/loss.parquet",
    log:
        f"{LOGS}/test_time/surgery.log",
    benchmark:
        f"{BENCH}/test_time/surgery.tsv"
    priority: 20
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=16000,
        runtime=120,
        gpu=config["merging"]["surgery"]["gpus"],
    params:
        data=data_args(TASKS),
        zoo=zoo_json(),
        tasks=TASKS,
        settings=test_time_settings("surgery"),
        max_images=config["merging"]["surgery"]["max_images"],
        code=code_version("adapt", "surgery"),
    shell:
        "adamerge adapt --zoo {params.zoo:q} --method surgery --pretrained {input.pretrained:q} "
        "--base {input.base:q} --finetuned {input.finetuned:q} --heads {input.heads:q} "
        "--tasks {params.tasks:q} --data {params.data:q} --settings {params.settings:q} "
        "--max-images {params.max_images:q} --out {output.model:q} --summary {output.summary:q} "
        "--curve {output.curve:q} --threads {threads} > {log:q} 2>&1"


rule wemoe:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        finetuned=finetuned(TASKS),
        heads=heads(TASKS),
        data=task_data(TASKS),
    output:
        model=TEST_TIME_MODEL["wemoe"],
        summary=f"{TT}/wemoe/summary.json",
        curve=f"{TT}/wemoe/entropy.parquet",
        routing=f"{TT}/wemoe/routing.parquet",
        figure=report(
            f"{TT}/wemoe/routing.png",
            category="Analysis",
            caption="../report/wemoe_routing.rst",
        ),
    log:
        f"{LOGS}/test_time/wemoe.log",
    benchmark:
        f"{BENCH}/test_time/wemoe.tsv"
    priority: 20
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=config["merging"]["wemoe"]["gpus"],
    params:
        data=data_args(TASKS),
        zoo=zoo_json(),
        tasks=TASKS,
        settings=test_time_settings("wemoe"),
        max_images=config["merging"]["wemoe"]["max_images"],
        code=code_version("adapt", "wemoe"),
    shell:
        "adamerge adapt --zoo {params.zoo:q} --method wemoe --pretrained {input.pretrained:q} "
        "--finetuned {input.finetuned:q} --heads {input.heads:q} --tasks {params.tasks:q} "
        "--data {params.data:q} --settings {params.settings:q} --max-images {params.max_images:q} "
        "--out {output.model:q} --summary {output.summary:q} --curve {output.curve:q} "
        "--routing {output.routing:q} --routing-figure {output.figure:q} --threads {threads} > {log:q} 2>&1"


rule evaluate_test_time:
    input:
        pretrained=f"{MODELS}/pretrained.safetensors",
        encoder=lambda wc: TEST_TIME_MODEL[wc.adapted],
        parts=lambda wc: (
            rules.surgery.output.modules + [SURGERY_BASE]
            if wc.adapted == "surgery"
            else []
        ),
        # what Surgery's manifest names
        heads=heads(TASKS),
        data=task_data(TASKS),
    output:
        f"{RESULTS}/eval/{{adapted}}.parquet",
    log:
        f"{LOGS}/evaluate/{{adapted}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{adapted}}.tsv"
    wildcard_constraints:
        adapted="|".join(TEST_TIME_METHODS) or "^$",
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        data=data_args(TASKS),
        zoo=zoo_json(),
        tasks=TASKS,
        batch=config["evaluation"]["batch_size"],
        code=lambda wc: code_version("evaluate", wc.adapted),
    shell:
        "adamerge evaluate --zoo {params.zoo:q} --model {wildcards.adapted:q} "
        "--method {wildcards.adapted:q} --pretrained {input.pretrained:q} --encoder {input.encoder:q} "
        "--tasks {params.tasks:q} --heads {input.heads:q} --data {params.data:q} --batch-size {params.batch:q} "
        "--out {output:q} --threads {threads} > {log:q} 2>&1"
