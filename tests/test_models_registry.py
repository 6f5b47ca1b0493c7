"""The model registry: local-path override, offline Hugging Face cache lookup, clear messages, `stag4d models`."""

import json

import pytest

from stag4d_backend import cli
from stag4d_backend.models import registry
from stag4d_backend.models.registry import MODELS, MissingWeightsError, ModelLoadError

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def isolated_hub(tmp_path, monkeypatch):
    """An empty HF cache in tmp, no STAG4D_*_PATH overrides, offline: nothing here may reach the network."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in MODELS.values():
        monkeypatch.delenv(spec.env_var, raising=False)
    return cache


def fill(folder, spec, weight_name="diffusion_pytorch_model.safetensors"):
    """Write the files that make `folder` count as a copy of `spec` (weights are a few dummy bytes)."""
    for rel in spec.required_files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("{}")
    for sub in spec.weight_folders:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / weight_name).write_bytes(b"\0" * 8)
    return folder


def fake_cache_snapshot(cache, spec, commit=FAKE_COMMIT, ref="main"):
    """The hub cache layout: models--org--name/snapshots/<commit>/... and refs/<branch> holding the commit."""
    repo = cache / f"models--{spec.repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / ref).write_text(commit)
    return fill(snap, spec)


def test_specs_are_complete_and_env_vars_follow_the_rule():
    assert set(MODELS) == {"zero123plus", "zero123-xl", "svd", "sdxl-turbo", "matting"}
    for name, spec in MODELS.items():
        assert spec.name == name
        assert spec.env_var == "STAG4D_" + name.upper().replace("-", "_") + "_PATH"
        assert spec.size_gb > 0 and spec.licence and spec.licence_note and spec.allow_patterns
        assert spec.required_files and spec.weight_folders
    assert MODELS["zero123plus"].repo_id == "sudo-ai/zero123plus-v1.1"
    assert "CC-BY-NC" in MODELS["zero123plus"].licence
    with pytest.raises(ValueError, match="zero123plus"):
        registry.get_spec("zero123")


def test_env_override_with_required_files_resolves(tmp_path, monkeypatch):
    folder = fill(tmp_path / "zpp", MODELS["zero123plus"], weight_name="diffusion_pytorch_model.bin")
    monkeypatch.setenv("STAG4D_ZERO123PLUS_PATH", str(folder))
    assert registry.resolve("zero123plus") == folder
    assert registry.locate("zero123plus").source == "$STAG4D_ZERO123PLUS_PATH"
    assert registry.is_present("zero123plus")
    # An explicit argument wins over the variable.
    other = fill(tmp_path / "other", MODELS["zero123plus"])
    assert registry.resolve("zero123plus", local_path=other) == other


def test_missing_everywhere_names_model_size_and_command():
    with pytest.raises(MissingWeightsError) as info:
        registry.resolve("zero123plus")
    msg = str(info.value)
    assert info.value.spec is MODELS["zero123plus"]
    for part in ("Zero123++ v1.1", "sudo-ai/zero123plus-v1.1", "3.9 GB", "CC-BY-NC-4.0",
                 "`stag4d models download zero123plus`", "STAG4D_ZERO123PLUS_PATH"):
        assert part in msg
    assert "\n" not in msg and "Traceback" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no hub traceback attached
    assert not registry.is_present("zero123plus")


def test_override_pointing_nowhere_or_at_an_incomplete_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("STAG4D_ZERO123_XL_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(MissingWeightsError, match="nowhere.*not a folder.*stag4d models download zero123-xl"):
        registry.resolve("zero123-xl")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match=r"partial.*lacks.*unet/config\.json"):
        registry.resolve("zero123-xl", local_path=partial)


def test_hf_cache_lookup_works_offline(isolated_hub):
    snap = fake_cache_snapshot(isolated_hub, MODELS["matting"])
    assert registry.resolve("matting") == snap
    assert registry.locate("matting").source == "HF cache"
    # A pinned commit (zero123-xl) is found by its snapshot folder, without refs/main.
    xl = MODELS["zero123-xl"]
    snap_xl = fake_cache_snapshot(isolated_hub, xl, commit=xl.revision, ref=None)
    assert registry.resolve("zero123-xl") == snap_xl


def test_incomplete_cache_snapshot_is_missing_with_reason(isolated_hub):
    snap = fake_cache_snapshot(isolated_hub, MODELS["sdxl-turbo"])
    (snap / "tokenizer_2" / "vocab.json").unlink()
    with pytest.raises(MissingWeightsError, match=r"incomplete.*tokenizer_2/vocab\.json.*sdxl-turbo"):
        registry.resolve("sdxl-turbo")


def test_check_vocab_refuses_an_almost_empty_tokenizer():
    class Tiny:
        name_or_path = "/somewhere/tokenizer"

        def __len__(self):
            return 3

    class Full(Tiny):
        def __len__(self):
            return 49408

    spec = MODELS["sdxl-turbo"]
    with pytest.raises(ModelLoadError, match="only 3 tokens.*stag4d models download sdxl-turbo"):
        registry.check_vocab(Tiny(), spec)
    registry.check_vocab(Full(), spec)


def test_dtype_per_device_and_variant_detection(tmp_path):
    import torch

    assert registry.torch_dtype("zero123plus", "cuda") == torch.float16
    assert registry.torch_dtype("zero123plus", "cuda:1") == torch.float16
    assert registry.torch_dtype("zero123plus", torch.device("cpu")) == torch.float32
    plain = fill(tmp_path / "plain", MODELS["svd"])
    assert registry.variant_for("svd", plain) is None
    fp16 = fill(tmp_path / "fp16", MODELS["svd"], weight_name="diffusion_pytorch_model.fp16.safetensors")
    assert registry.variant_for("svd", fp16) == "fp16"
    assert registry.variant_for("zero123plus", fp16) is None


def test_licence_notice_says_non_commercial_before_use():
    text = registry.licence_notice(["zero123plus", "svd", "zero123plus"])
    assert text.count("Zero123++ v1.1") == 1
    assert "CC-BY-NC" in text and "non-commercial" in text and "gated" in text.lower()


def test_download_offline_fails_fast_with_one_line(capsys):
    assert cli.main(["models", "download", "zero123plus"]) == 2
    err = capsys.readouterr().err
    assert "CC-BY-NC" in err.splitlines()[0]  # the licence terms come first
    last = err.strip().splitlines()[-1]
    assert last.startswith("stag4d models:") and "HF_HUB_OFFLINE" in last and "STAG4D_ZERO123PLUS_PATH" in last
    assert "Traceback" not in err


def test_download_network_failures_become_one_line(monkeypatch):
    import huggingface_hub

    class GatedRepoError(Exception):
        pass

    def gated(*args, **kwargs):
        raise GatedRepoError("401 Client Error")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(registry.DownloadError, match="gated.*hf auth login"):
        registry.download("svd")

    def no_network(*args, **kwargs):
        raise OSError("boom") from ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(MissingWeightsError, match="ConnectionError: Name or service not known") as info:
        registry.download("matting")
    assert "\n" not in str(info.value)


def test_download_success_returns_the_checked_folder(monkeypatch, tmp_path):
    import huggingface_hub

    done = fill(tmp_path / "snap", MODELS["matting"], weight_name="model.safetensors")
    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(done)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert registry.download("matting") == done
    assert seen["repo_id"] == "ZhengPeng7/BiRefNet" and "model.safetensors" in seen["allow_patterns"]
    assert "local_files_only" not in seen


def test_models_list_and_json(isolated_hub, capsys):
    fake_cache_snapshot(isolated_hub, MODELS["matting"])
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "present" in lines["matting"] and "HF cache" in lines["matting"]
    assert "missing" in lines["zero123plus"] and "CC-BY-NC-4.0" in lines["zero123plus"]
    assert "3.9 GB" in lines["zero123plus"]

    assert cli.main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["matting"]["present"] and rows["matting"]["source"] == "HF cache"
    assert not rows["svd"]["present"] and "stag4d models download svd" in rows["svd"]["problem"]
    assert cli.main(["models"]) == 0  # bare `models` lists


def test_models_path(tmp_path, monkeypatch, capsys):
    assert cli.main(["models", "path", "svd"]) == 2
    assert "stag4d models download svd" in capsys.readouterr().err
    folder = fill(tmp_path / "svd", MODELS["svd"])
    monkeypatch.setenv("STAG4D_SVD_PATH", str(folder))
    assert cli.main(["models", "path", "svd"]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert cli.main(["models", "path", "nope"]) == 2
    assert "known models" in capsys.readouterr().err


def test_doctor_lists_each_model():
    from stag4d_backend.doctor import weights_report

    report = weights_report()
    for name in MODELS:
        assert report[f"weights {name}"].startswith("missing")
    assert "stag4d models download zero123plus" in report["weights zero123plus"]


def test_library_floors_admit_no_version_known_to_break_the_loaders():
    """transformers 4.50-4.55 raise `TypeError: Object of type dtype is not JSON serializable` in
    CLIPVisionModelWithProjection.from_pretrained(..., dtype=...), which models/zero123_xl.py calls: the floor is
    4.56, and the installed version (what the suite tests) satisfies it."""
    import tomllib
    from pathlib import Path

    import transformers
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    spec = next(Requirement(d).specifier for d in deps["dependencies"] if d.startswith("transformers"))
    for broken in ("4.50.0", "4.53.3", "4.55.4"):
        assert Version(broken) not in spec, broken
    assert Version("4.56.0") in spec and Version(transformers.__version__) in spec
