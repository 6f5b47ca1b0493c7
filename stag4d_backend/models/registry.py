"""Which diffusion/matting models the backend uses, where their weights live, and what their licences say.

The one place that knows model ids, revisions, sizes, licences, dtypes and local paths (docs/models.md).
Lookups never touch the network: a path comes from an explicit argument, then the model's
STAG4D_<NAME>_PATH variable, then the standard Hugging Face cache (local files only). Only `download`
goes online. Missing or broken weights raise one-line errors that name the model, its size and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class MissingWeightsError(RuntimeError):
    """The weights of a model are not installed where we look. str() is one line naming the fix."""

    def __init__(self, spec: "ModelSpec", message: str | None = None):
        self.spec = spec
        super().__init__(message or f"{_describe(spec)} is not installed here. {_how_to_get(spec)}")


class DownloadError(MissingWeightsError):
    """`download` could not fetch the weights (offline, gated, network). Still missing, hence the base class."""


class ModelLoadError(RuntimeError):
    """The weights are present but unusable (a tokenizer with almost no vocabulary, missing config, ...)."""

    def __init__(self, message: str, spec: "ModelSpec | None" = None):
        self.spec = spec
        super().__init__(message)


@dataclass(frozen=True)
class ModelSpec:
    name: str                 # registry key, also the CLI name
    title: str
    repo_id: str
    revision: str             # a commit hash where verified, else "main" (docs/models.md says which)
    size_gb: float            # approximate size of what `download` fetches (allow_patterns)
    licence: str
    licence_note: str         # shown before download and by `licence_notice`
    purpose: str
    dtype_cuda: str
    dtype_cpu: str
    env_var: str              # STAG4D_<NAME>_PATH: a local folder that replaces the cache lookup
    allow_patterns: tuple[str, ...]
    required_files: tuple[str, ...]
    variant: str | None = None
    # Folders ("." = the root) that must hold at least one *.safetensors/*.bin file: catches half-finished
    # downloads without pinning weight file names (plain, fp16 variant, sharded, .bin all count).
    weight_folders: tuple[str, ...] = ()
    gated: bool = False       # the Hub asks you to accept the licence and log in before downloading
    licence_url: str = ""
    loader: str = ""          # how the stage code loads it (for docs and error messages)


def _env_var(name: str) -> str:
    return f"STAG4D_{name.upper().replace('-', '_')}_PATH"


def _spec(name: str, **kw) -> ModelSpec:
    return ModelSpec(name=name, env_var=_env_var(name), **kw)


_SD_PARTS = ("model_index.json", "*/*.json", "*/*.txt")  # pipeline index, component configs, tokenizer files

MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    _spec(
        "zero123plus",
        title="Zero123++ v1.1",
        repo_id="sudo-ai/zero123plus-v1.1",
        revision="main",
        size_gb=3.9,
        licence="CC-BY-NC-4.0",
        licence_note=("Zero123++ weights are licensed CC-BY-NC 4.0 by SUDO AI: non-commercial use only, with "
                      "attribution (its code and the custom pipeline are Apache-2.0). Whether generated anchor "
                      "views and the 4D results fitted from them may be used commercially is not settled: ask "
                      "SUDO AI before any commercial use."),
        purpose="six anchor views per frame with first-frame attention fusion (stage B)",
        dtype_cuda="float16",
        dtype_cpu="float32",
        # The weights are stored in fp16 as plain (non-variant) files; fetch every weight file, nothing else.
        allow_patterns=_SD_PARTS + ("*/*.safetensors", "*/*.bin"),
        required_files=("model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                        "vae/config.json", "text_encoder/config.json", "tokenizer/vocab.json",
                        "tokenizer/merges.txt", "vision_encoder/config.json",
                        "feature_extractor_clip/preprocessor_config.json",
                        "feature_extractor_vae/preprocessor_config.json"),
        weight_folders=("unet", "vae", "text_encoder", "vision_encoder"),
        licence_url="https://github.com/SUDO-AI-3D/zero123plus#license",
        loader="diffusers pipeline with the Zero123++ custom pipeline (sudo-ai/zero123plus-pipeline, "
               "Apache-2.0); ramping_coefficients live in model_index.json",
    ),
    _spec(
        "zero123-xl",
        title="Zero123-XL",
        repo_id="ashawkey/zero123-xl-diffusers",
        revision="10e9e8e75adaa3bf77f5ac9c381419016fed68c7",  # "Create zero123.py", Nov 2023: main's head
        size_gb=2.5,
        licence="MIT (see note)",
        licence_note=("The Hugging Face repo is tagged MIT, like the Zero-1-to-3 code (cvlab-columbia/zero123). "
                      "The weights are fine-tuned from Stable Diffusion image variations (CreativeML OpenRAIL-M "
                      "use restrictions may carry over) on Objaverse-XL, whose objects carry their own "
                      "licences. Not confirmed by the original authors here: verify before commercial use."),
        purpose="Zero123 SDS guidance during the fit (section 8)",
        dtype_cuda="float16",
        dtype_cpu="float32",
        # Weights are stored in fp16 as plain files; zero123.py holds the Zero123Pipeline/CLIPCameraProjection.
        allow_patterns=("model_index.json", "*/*.json", "*/*.safetensors", "clip_camera_projection/zero123.py"),
        required_files=("model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                        "vae/config.json", "image_encoder/config.json", "clip_camera_projection/config.json",
                        "feature_extractor/preprocessor_config.json"),
        weight_folders=("unet", "vae", "image_encoder", "clip_camera_projection"),
        licence_url="https://huggingface.co/ashawkey/zero123-xl-diffusers",
        loader="diffusers UNet2DConditionModel/AutoencoderKL/DDIMScheduler + transformers "
               "CLIPVisionModelWithProjection/CLIPImageProcessor + Linear(772->768) camera projection",
    ),
    _spec(
        "svd",
        title="Stable Video Diffusion img2vid-xt",
        repo_id="stabilityai/stable-video-diffusion-img2vid-xt",
        revision="main",
        size_gb=4.5,
        licence="Stability-AI-Community",
        licence_note=("Stability AI Community License: free for research, non-commercial use, and commercial "
                      "use by individuals or organisations with less than USD 1M annual revenue; above that "
                      "an Enterprise licence from Stability AI is needed. Stability's Acceptable Use Policy "
                      "applies. Gated: accept the licence on the model page and log in (`hf auth login`) "
                      "before downloading."),
        purpose="image-to-video: the input frames for image and prompt requests",
        dtype_cuda="float16",
        dtype_cpu="float32",
        # Only the fp16 diffusers components, not the fp32 copies or the 9.5 GB single-file checkpoints.
        allow_patterns=("model_index.json", "*/*.json", "*/*.fp16.safetensors"),
        required_files=("model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                        "vae/config.json", "image_encoder/config.json",
                        "feature_extractor/preprocessor_config.json"),
        variant="fp16",
        weight_folders=("unet", "vae", "image_encoder"),
        gated=True,
        licence_url="https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt",
        loader="diffusers StableVideoDiffusionPipeline",
    ),
    _spec(
        "sdxl-turbo",
        title="SDXL-Turbo",
        repo_id="stabilityai/sdxl-turbo",
        revision="main",
        size_gb=6.9,
        licence="SAI-NC-Community",
        licence_note=("Stability AI Non-Commercial Research Community License: research and non-commercial "
                      "use only; commercial use needs a separate licence from Stability AI. Stability's "
                      "Acceptable Use Policy applies. Check the model page for the current terms."),
        purpose="text-to-image: the first image for prompt requests",
        dtype_cuda="float16",
        dtype_cpu="float32",
        allow_patterns=_SD_PARTS + ("*/*.fp16.safetensors",),
        required_files=("model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                        "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json",
                        "tokenizer_2/merges.txt"),
        variant="fp16",
        weight_folders=("unet", "vae", "text_encoder", "text_encoder_2"),
        licence_url="https://huggingface.co/stabilityai/sdxl-turbo",
        loader="diffusers AutoPipelineForText2Image (StableDiffusionXLPipeline)",
    ),
    _spec(
        "matting",
        title="BiRefNet (matting)",
        repo_id="ZhengPeng7/BiRefNet",
        revision="main",
        size_gb=0.9,
        licence="MIT",
        licence_note=("BiRefNet is MIT-licensed: commercial use is allowed if the copyright notice is kept. "
                      "Loading runs Python code shipped in the model repo (trust_remote_code): pin a revision "
                      "you have reviewed."),
        purpose="cuts the object out of each input frame (preprocess)",
        dtype_cuda="float16",
        dtype_cpu="float32",
        allow_patterns=("config.json", "*.py", "model.safetensors"),
        required_files=("config.json", "birefnet.py", "BiRefNet_config.py"),
        weight_folders=(".",),
        licence_url="https://huggingface.co/ZhengPeng7/BiRefNet",
        loader="transformers AutoModelForImageSegmentation.from_pretrained(path, trust_remote_code=True)",
    ),
)}


# ----------------------------------------------------------------------------------------------------------
# Messages


def _describe(spec: ModelSpec) -> str:
    return f"{spec.title} ({spec.repo_id}, about {spec.size_gb:g} GB, licence {spec.licence})"


def _how_to_get(spec: ModelSpec) -> str:
    gated = (" The repo is gated: accept its licence on huggingface.co and log in with `hf auth login` first."
             if spec.gated else "")
    return (f"Get it with `stag4d models download {spec.name}`, or point {spec.env_var} at a local copy."
            f"{gated}")


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


# ----------------------------------------------------------------------------------------------------------
# Finding weights on disk


def hf_cache_dir() -> Path:
    """The standard Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at
    import, so tests and late `export`s would otherwise be ignored)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def missing_files(spec: ModelSpec, folder: Path) -> list[str]:
    """What `folder` lacks to count as a copy of `spec` (empty list = complete)."""
    missing = [rel for rel in spec.required_files if not (folder / rel).is_file()]
    for sub in spec.weight_folders:
        d = folder / sub
        if not (d.is_dir() and any(p.suffix in _WEIGHT_SUFFIXES for p in d.iterdir())):
            missing.append(f"{'' if sub == '.' else sub + '/'}*.safetensors")
    return missing


def _check_folder(spec: ModelSpec, folder: Path, origin: str) -> Path:
    if not folder.is_dir():
        raise MissingWeightsError(spec, f"{origin} points at {folder}, which is not a folder, so {_describe(spec)} "
                                        f"is not available. {_how_to_get(spec)}")
    missing = missing_files(spec, folder)
    if missing:
        raise MissingWeightsError(spec, f"{origin} points at {folder}, which is not a complete copy of "
                                        f"{_describe(spec)}: it lacks {_short_list(missing)}. {_how_to_get(spec)}")
    return folder


def _short_list(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


@dataclass(frozen=True)
class Location:
    path: Path
    source: str               # "argument", "$STAG4D_..._PATH" or "HF cache"


def locate(name: str, local_path: str | os.PathLike | None = None) -> Location:
    """Where the weights are and how we found them; MissingWeightsError (never a hub traceback) otherwise."""
    spec = get_spec(name)
    if local_path is not None and str(local_path) != "":
        return Location(_check_folder(spec, Path(local_path).expanduser(), "The given model path"), "argument")
    env = os.environ.get(spec.env_var, "")
    if env:
        return Location(_check_folder(spec, Path(env).expanduser(), f"${spec.env_var}"), f"${spec.env_var}")
    cache = hf_cache_dir()
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec.repo_id, revision=spec.revision, cache_dir=str(cache),
                                        allow_patterns=list(spec.allow_patterns), local_files_only=True))
    except Exception:  # noqa: BLE001 - any hub failure here means "not in the cache"; the fix is the same
        raise MissingWeightsError(spec, f"{_describe(spec)} is not installed here (looked in "
                                        f"{spec.env_var} and the Hugging Face cache {cache}). "
                                        f"{_how_to_get(spec)}") from None
    missing = missing_files(spec, folder)
    if missing:
        raise MissingWeightsError(spec, f"The Hugging Face cache holds an incomplete copy of {_describe(spec)} at "
                                        f"{folder}: it lacks {_short_list(missing)} (an interrupted download?). "
                                        f"{_how_to_get(spec)}")
    return Location(folder, "HF cache")


def resolve(name: str, local_path: str | os.PathLike | None = None) -> Path:
    """The folder holding `name`'s weights: local_path > $STAG4D_<NAME>_PATH > HF cache (offline lookup)."""
    return locate(name, local_path).path


def is_present(name: str) -> bool:
    try:
        resolve(name)
    except MissingWeightsError:
        return False
    return True


@dataclass(frozen=True)
class ModelStatus:
    spec: ModelSpec
    location: Location | None
    problem: str | None = field(default=None)   # the MissingWeightsError message when absent


def status(name: str) -> ModelStatus:
    spec = get_spec(name)
    try:
        return ModelStatus(spec, locate(name))
    except MissingWeightsError as exc:
        return ModelStatus(spec, None, str(exc))


# ----------------------------------------------------------------------------------------------------------
# Loading helpers


def torch_dtype(name: str, device) -> "torch.dtype":  # noqa: F821 - torch is imported lazily
    """The dtype to load `name` in on `device`: half precision on CUDA where the model supports it, float32
    elsewhere (CPU and MPS kernels for fp16 are slow or missing)."""
    import torch

    spec = get_spec(name)
    kind = torch.device(device).type
    return getattr(torch, spec.dtype_cuda if kind == "cuda" else spec.dtype_cpu)


def variant_for(name: str, folder: str | os.PathLike) -> str | None:
    """The diffusers variant to pass for the weights in `folder`: the spec's variant only if such files are
    there (a local copy saved without variants loads as plain weights)."""
    spec = get_spec(name)
    if spec.variant is None:
        return None
    tag = f".{spec.variant}."
    for sub in spec.weight_folders:
        d = Path(folder) / sub
        if d.is_dir() and any(tag in p.name for p in d.iterdir()):
            return spec.variant
    return None


def component_variant(folder: str | os.PathLike) -> str | None:
    """The variant to load one component folder with: None when it holds plain weight files
    (``model.safetensors``, ``diffusion_pytorch_model-00001-of-00002.safetensors``), else the tag of its variant
    files (``diffusion_pytorch_model.fp16.safetensors`` -> "fp16"): some copies hold only those, and
    ``from_pretrained`` without ``variant=`` finds no weights there."""
    d = Path(folder)
    if not d.is_dir():
        return None
    tags = set()
    for p in d.iterdir():
        if p.suffix not in _WEIGHT_SUFFIXES:
            continue
        parts = p.name[: -len(p.suffix)].split(".")
        if len(parts) == 1:
            return None
        tags.add(parts[-1])
    return "fp16" if "fp16" in tags else (sorted(tags)[0] if tags else None)


def check_vocab(tokenizer, spec: ModelSpec, minimum: int = 1000) -> None:
    """Offline `from_pretrained` can hand back an almost empty tokenizer when vocab files are missing; every
    prompt would then encode to unknown tokens without an error. Refuse it instead."""
    try:
        size = len(tokenizer)
    except TypeError:
        size = int(getattr(tokenizer, "vocab_size", 0) or 0)
    if size < minimum:
        where = getattr(tokenizer, "name_or_path", "") or "its folder"
        raise ModelLoadError(f"The tokenizer of {spec.title} loaded from {where} has only {size} tokens "
                             f"(expected at least {minimum}): its vocabulary files are missing or broken. "
                             f"Re-download with `stag4d models download {spec.name}` or fix {spec.env_var}.",
                             spec)


def licence_notice(names: Iterable[str]) -> str:
    """The licence terms to show before the named models are downloaded or used, one paragraph each."""
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return "\n".join(f"{s.title} ({s.repo_id}), licence {s.licence}: {s.licence_note}"
                     + (f" Terms: {s.licence_url}" if s.licence_url else "")
                     for s in map(get_spec, seen))


# ----------------------------------------------------------------------------------------------------------
# Downloading


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(name: str) -> Path:
    """Fetch `name` into the standard Hugging Face cache (only the files the stages use); the only function
    here that touches the network. Failures raise DownloadError with one clear line."""
    spec = get_spec(name)
    copy_hint = (f"Download on a machine with network access and copy its Hugging Face cache here, or point "
                 f"{spec.env_var} at a copy (docs/models.md).")
    if _offline():  # checked now: huggingface_hub reads HF_HUB_OFFLINE only once, at import
        raise DownloadError(spec, f"Cannot download {_describe(spec)}: HF_HUB_OFFLINE is set. {copy_hint}")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec.repo_id, revision=spec.revision, cache_dir=str(hf_cache_dir()),
                                        allow_patterns=list(spec.allow_patterns)))
    except Exception as exc:  # noqa: BLE001 - reduce any hub/network failure to one line
        kind = type(exc).__name__
        if kind == "GatedRepoError" or getattr(getattr(exc, "response", None), "status_code", None) in (401, 403):
            reason = (f"the repo is gated or needs a login: accept its licence at "
                      f"https://huggingface.co/{spec.repo_id} and run `hf auth login`")
        else:
            root = exc
            while root.__cause__ is not None:  # the hub wraps the network error; name the network error
                root = root.__cause__
            text = str(root).strip().splitlines()[0][:200] if str(root).strip() else ""
            reason = f"{type(root).__name__}: {text}" if text else type(root).__name__
            if any(w in type(root).__name__ for w in ("Connect", "Timeout", "Offline")):
                reason = f"no connection to the Hugging Face Hub ({reason})"
        raise DownloadError(spec, f"Could not download {_describe(spec)}: {reason}. {copy_hint}") from None
    missing = missing_files(spec, folder)
    if missing:
        raise DownloadError(spec, f"Downloaded {spec.repo_id}@{spec.revision} to {folder}, but it lacks "
                                  f"{_short_list(missing)}: the repo layout changed; please report it.")
    return folder
