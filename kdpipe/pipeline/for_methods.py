"""`kdpipe extract --for-methods tinybert,minilmv2 --student-layers 6`: the teacher signals those methods
will need, worked out from the methods' own declarations, so users do not write layer lists by hand."""

from __future__ import annotations

from typing import Any

from kdpipe.errors import UserError
from kdpipe.modelio import load_config, resolve_teacher
from kdpipe.stage2_distill.methods.base import Context, build_methods
from kdpipe.storage.manifest import TeacherInfo


def signals_for_methods(specs: list[str], teacher: str, student_layers: int,
                        trust_remote_code: bool = False) -> dict[str, Any]:
    """Extract settings (hidden layers, attention layers and form, temperatures, sample count)."""
    if student_layers < 1:
        raise UserError("--student-layers must be at least 1 with --for-methods")
    source = resolve_teacher(teacher)
    config = load_config(source, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    info = TeacherInfo(name=teacher, architecture="", num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                       num_heads=heads, num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                       head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
                       vocab_size=text.vocab_size, dtype="", config_sha256="")
    ctx = Context(teacher=info, temperatures=[1.0], student_layers=student_layers, student_hidden=text.hidden_size,
                  total_steps=1, cached_hidden=list(range(info.num_layers + 1)))
    needs = [m.needs() for m in build_methods(specs, ctx)]
    hidden = sorted({x for n in needs for x in n.hidden})
    attention = sorted({x for n in needs for x in n.factors + n.attention})
    temperatures = sorted({1.0} | {t for n in needs for t in n.temperatures})
    return {
        "hidden_layers": ",".join(map(str, hidden)) or "none",
        "attention_layers": ",".join(map(str, attention)) or "none",
        # Q/K/V factors serve every attention-based method: scores, distributions and relations
        "attention_form": "factors",
        "temperatures": temperatures,
        "sample_count": 32 if any(n.sampled for n in needs) else 0,
        "interchange_layers": ",".join(map(str, sorted({x for n in needs for x in n.interchange}))) or "none",
    }
