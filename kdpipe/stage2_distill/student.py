"""Building the student: from a config file, a preset of the teacher's shape, a pretrained directory, or
initialized from chosen teacher layers (DistilBERT-style, reading the teacher's weights once)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdpipe.capture import find_blocks, text_config
from kdpipe.errors import UserError
from kdpipe.stage2_distill.layermap import map_layers
from kdpipe.storage.manifest import TeacherInfo


@dataclass
class Student:
    model: nn.Module
    description: str
    pretrained: bool


def _preset_config(teacher: TeacherInfo, overrides: dict[str, str]):
    """The teacher's config with fewer layers or a smaller width; head size is kept, heads follow width."""
    import transformers

    if not teacher.config:
        raise UserError("this cache does not record the teacher's config: pass --student a config.json instead")
    # the cache's copy of the teacher's config is input: nothing in it may point at code to run
    raw = {k: v for k, v in teacher.config.items() if k not in ("quantization_config", "_name_or_path", "auto_map")}
    try:
        config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"the cache's teacher config cannot build a student ({type(exc).__name__}: {exc}): pass "
                        f"--student a config.json or a model directory") from None
    known = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
             "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size"}
    unknown = set(overrides) - set(known)
    if unknown:
        raise UserError(f"unknown student preset key {sorted(unknown)[0]!r}: use {', '.join(known)}")
    try:
        values = {k: int(v) for k, v in overrides.items()}
    except ValueError:
        raise UserError(f"student preset values must be integers: {overrides}") from None
    if "hidden" in values:
        width = values["hidden"]
        heads = values.get("heads") or max(1, width // teacher.head_dim)
        if width % heads:
            raise UserError(f"student hidden size {width} is not divisible by {heads} heads: set heads=")
        values["heads"] = heads
        kv = values.get("kv_heads") or max(1, heads * teacher.num_kv_heads // teacher.num_heads)
        while heads % kv:
            kv -= 1
        values["kv_heads"] = kv
        if "intermediate" not in values and getattr(config, "intermediate_size", None):
            values["intermediate"] = max(1, config.intermediate_size * width // teacher.hidden_size)
        if hasattr(config, "head_dim"):
            config.head_dim = width // heads
    for key, value in values.items():
        if key == "kv_heads" and not hasattr(config, "num_key_value_heads"):
            continue
        setattr(config, known[key], value)
    if "layers" in values:
        per_layer(config, teacher.num_layers, values["layers"])
    return config


def per_layer(config, teacher_layers: int, layers: int) -> None:
    """A student of fewer layers takes, of every per-layer setting (Gemma's and Qwen's `layer_types`: which
    layers attend within a sliding window), the values of the teacher layers it is mapped to, so that its
    config is consistent from the start (transformers refuses to save one that is not)."""
    picks = [t - 1 for _, t in map_layers("uniform", layers, teacher_layers)]
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == teacher_layers and teacher_layers != layers:
            setattr(config, key, type(value)(value[i] for i in picks))


def build_student(spec: str, teacher: TeacherInfo, seed: int, init_from_teacher: str | None = None,
                  layer_map: str = "uniform", trust_remote_code: bool = False) -> Student:
    """`teacher:layers=6,hidden=256` | path/to/config.json | pretrained directory."""
    import transformers

    torch.manual_seed(seed)
    pretrained = False
    albert: dict[str, int] = {}
    if spec == "teacher" or spec.startswith("teacher:"):
        overrides = dict(item.split("=", 1) for item in spec.partition(":")[2].split(",") if "=" in item)
        albert = _albert_options(overrides)
        config = _preset_config(teacher, overrides)
        model = transformers.AutoModelForCausalLM.from_config(config)
        what = f"teacher-shaped ({config.num_hidden_layers} layers, hidden {config.hidden_size})"
    elif spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"student config {spec} does not exist")
        raw = json.loads(path.read_text())
        if "model_type" not in raw:
            raise UserError(f"student config {spec} has no model_type")
        config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
        model = transformers.AutoModelForCausalLM.from_config(config)
        what = f"from config {spec}"
    else:
        path = Path(spec)
        if not (path / "config.json").exists():
            raise UserError(f"--student {spec} is neither teacher:key=value, a config .json, nor a model directory")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
        pretrained = True
        what = f"pretrained {spec}"
    _check_saveable(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab != teacher.vocab_size:
        raise UserError(f"the student's vocabulary has {vocab} entries but the teacher's has {teacher.vocab_size}: "
                        f"logit distillation needs the same tokenizer and vocabulary size")
    if init_from_teacher:
        what += ", " + init_from_teacher_layers(model, init_from_teacher, layer_map)
        pretrained = True
    if albert:
        from kdpipe.stage2_distill.albert import albertize

        size = albert["embedding"] if albert["embedding"] >= 0 else min(128, text_config(model).hidden_size // 2)
        what += ", " + albertize(model, size, albert["share"])
    return Student(model=model, description=what, pretrained=pretrained)


def _check_saveable(model: nn.Module) -> None:
    """Save the student's config once before training: a config transformers will not save would otherwise
    fail only after the last step, with the run's result unsaved."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.config.save_pretrained(tmp)
    except (ValueError, TypeError) as exc:
        raise UserError(f"the student's config is not consistent ({exc}): set its layers, heads and widths so that "
                        f"they agree") from None


def _albert_options(overrides: dict[str, str]) -> dict[str, int]:
    """`albert=1`: every layer runs one shared block and the embeddings are factorized at
    min(128, H/2); `share=N` (N distinct blocks, cycled) and `embedding=E` set either part alone or
    override it (share=0 / embedding=0: off). Removed from `overrides`; {} when not ALBERT."""
    keys = {k: overrides.pop(k) for k in ("albert", "share", "embedding") if k in overrides}
    try:
        values = {k: int(v) for k, v in keys.items()}
    except ValueError:
        raise UserError(f"albert, share and embedding take integers: {keys}") from None
    if any(v < 0 for v in values.values()):
        raise UserError("albert, share and embedding must be 0 or more")
    on = bool(values.pop("albert", 0))
    options = {"share": values.get("share", 1 if on else 0), "embedding": values.get("embedding", -1 if on else 0)}
    return options if any(options.values()) else {}


def init_from_teacher_layers(student: nn.Module, teacher_path: str, layer_map: str) -> str:
    """Copy the teacher's embeddings, final norm, head, and the blocks the layer map picks (DistilBERT
    takes every other layer). Reads the teacher's weights once; the teacher never runs."""
    from kdpipe.modelio import load_teacher, resolve_teacher

    teacher = load_teacher(resolve_teacher(teacher_path))
    if text_config(teacher).hidden_size != text_config(student).hidden_size:
        raise UserError("--init-from-teacher needs the student's hidden size equal to the teacher's")
    t_blocks, s_blocks = find_blocks(teacher), find_blocks(student)
    pairs = map_layers(layer_map, len(s_blocks), len(t_blocks))
    t_prefix = {id(m): n for n, m in teacher.named_modules()}
    block_names = {t_prefix[id(b)] for b in t_blocks}
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    copied = 0
    for name, tensor in t_state.items():  # everything outside the blocks: embeddings, norms, head
        if not any(name.startswith(b + ".") for b in block_names) and name in s_state \
                and s_state[name].shape == tensor.shape:
            s_state[name] = tensor.clone()
            copied += 1
    s_prefix = {id(m): n for n, m in student.named_modules()}
    for s_layer, t_layer in pairs:
        if s_layer == 0 or t_layer == 0:
            continue
        sp, tp = s_prefix[id(s_blocks[s_layer - 1])], t_prefix[id(t_blocks[t_layer - 1])]
        for name, tensor in t_state.items():
            if name.startswith(tp + "."):
                target = sp + name[len(tp):]
                if target in s_state and s_state[target].shape == tensor.shape:
                    s_state[target] = tensor.clone()
                    copied += 1
    student.load_state_dict(s_state)
    return f"initialized from teacher layers {[t for _, t in pairs]} ({copied} tensors)"


def save_student(model: nn.Module, engine, path: Path, cache=None) -> None:
    """save_pretrained (ZeRO-3's partitioned parameters gathered first; an ALBERT-style student multiplied
    out to the plain model it computes), with the teacher's tokenizer from `cache` beside it, so the
    student loads with `AutoModelForCausalLM`/`AutoTokenizer` and can be a teacher in turn (TAKD)."""
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if engine.global_rank == 0:
                model.save_pretrained(path, state_dict={k: v.clone() for k, v in model.state_dict().items()})
    else:
        if getattr(model, "kdpipe_albert", False):
            from kdpipe.stage2_distill.albert import export

            model = export(model)
        if engine is None or engine.global_rank == 0:
            model.save_pretrained(path)
    if cache is not None:
        for name, data in cache.tokenizer_files().items():  # names were checked to be plain file names
            (path / name).write_bytes(data)
