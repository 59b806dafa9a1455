import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import save_teacher, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {arch: save_teacher(root / arch, arch) for arch in ("llama", "gpt2", "bert")}


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
