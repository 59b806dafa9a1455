import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# one compiled-op cache for this process and every kdpipe process a test starts
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "kdpipe-torch-extensions"))

# DeepSpeed compiles its CPU ops on first use: about 2.5 minutes on 2 cores, most of it the async I/O op
# that NVMe offload needs. A fresh machine builds them in the background while the first tests run; a
# test that needs an op before it is ready waits on torch's build lock instead of building it twice.
PREBUILD = ("from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as A; A().load(); "
            "from deepspeed.ops.op_builder.cpu.pin_memory import PinMemoryBuilder as B; B().load(); "
            "from deepspeed.ops.op_builder.cpu.async_io import AsyncIOBuilder as C; C().is_compatible() and C().load()")
_prebuild: subprocess.Popen | None = None


def pytest_sessionstart(session) -> None:
    global _prebuild
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "async_io" / "async_io.so"
    if os.environ["DS_ACCELERATOR"] == "cpu" and not built.exists():
        _prebuild = subprocess.Popen([sys.executable, "-c", PREBUILD], env=dict(os.environ, MAX_JOBS="1"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session) -> None:
    if _prebuild is not None:
        _prebuild.wait()  # a build killed half-way would leave torch's lock file, and the next build waiting on it

from tiny import FAMILIES, save_teacher, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {arch: save_teacher(root / arch, arch) for arch in (*FAMILIES, "bert")}


@pytest.fixture(scope="session")
def layer_cache(tmp_path_factory, corpus) -> Path:
    """A sharp tiny Llama teacher's cache with every hidden layer and every block's Q/K/V factors."""
    from kdpipe.stage1_extract.extractor import ExtractConfig, extract

    root = tmp_path_factory.mktemp("layers")
    teacher = save_teacher(root / "teacher", "llama", sharpness=30)
    extract(ExtractConfig(teacher=str(teacher), data=[str(corpus)], out=str(root / "cache"), seq_len=32, top_k=16,
                          hidden_layers="all", attention_layers="all", attention_form="factors",
                          sequences_per_unit=4, quiet=True))
    return root / "cache"
