"""The download verbs as the workflow runs them: a subprocess with HF_ENDPOINT and the Hub
cache in its environment (read when huggingface_hub is imported), online then offline."""

import os
import subprocess
import sys

from helpers.hub_server import HubServer, add_repo
from helpers.workflow import REPO

from pipeline.hub import read_manifest

SCRIPT = ("import sys; from pipeline.commands.download import download_model, download_dataset; "
          "download_model('org/tiny-clip', 'main', sys.argv[1]); "
          "download_dataset('org/tiny-ds', 'main', sys.argv[2], ('data/test-*',))")


def test_the_verbs_write_manifests_online_then_offline(tmp_path):
    root, cache = tmp_path / "hub", tmp_path / "hf-cache"
    add_repo(root, "org/tiny-clip", {"config.json": b"{}", "model.safetensors": b"weights", "pytorch_model.bin": b"p"})
    add_repo(root, "org/tiny-ds", {"data/test-00000-of-00001.parquet": b"t", "data/train-00000-of-00001.parquet": b"r"},
             repo_type="dataset")
    outs = [str(tmp_path / "model.json"), str(tmp_path / "data.json")]

    def run(env):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, *outs], cwd=REPO, env={**os.environ, **env},
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [read_manifest(o) for o in outs]

    with HubServer(root) as hub:
        model, data = run(hub.env(cache))
        assert any(r.startswith("GET /cdn/") for r in hub.requests)
    assert model.commit == hub.commit("org/tiny-clip") and model.path.is_relative_to(cache)
    assert list(model.files) == ["config.json", "model.safetensors"]
    assert list(data.files) == ["data/test-00000-of-00001.parquet"]
    assert run(hub.env(cache) | {"HF_HUB_OFFLINE": "1"}) == [model, data]  # the server is gone
