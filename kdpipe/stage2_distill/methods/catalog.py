"""The 25 methods of GKD (Tan et al. 2023): paper, what each needs from the teacher, and whether kdpipe
runs it from the cache yet. `kdpipe methods` prints this table."""

from __future__ import annotations

# name, paper, teacher signals, group
GKD_METHODS = [
    ("kd", "Hinton et al. 2015", "top-k logits (or sampled) at T", "logits"),
    ("pd", "Turc et al. 2019", "top-k logits at T; a pre-trained student", "logits"),
    ("distilbert", "Sanh et al. 2019", "top-k logits at T, last hidden state", "logits"),
    ("annealing_kd", "Jafari et al. 2021", "top-k raw logits", "logits"),
    ("tinybert", "Jiao et al. 2020", "embeddings, hidden states, attention of mapped layers", "layers"),
    ("minilm", "Wang et al. 2020", "last-layer attention and value relations", "layers"),
    ("minilmv2", "Wang et al. 2021", "Q-Q, K-K, V-V relations of one layer", "layers"),
    ("mobilebert", "Sun et al. 2020", "per-layer hidden states and attention", "layers"),
    ("pkd", "Sun et al. 2019", "pooled hidden states of skip/last layers", "layers"),
    ("sid", "Aguilar et al. 2020", "hidden states and attention, layer by layer", "layers"),
    ("alp_kd", "Passban et al. 2021", "hidden states of all layers", "layers"),
    ("ckd", "Park et al. 2021", "hidden states (word and layer relations)", "layers"),
    ("universal_kd", "Wu et al. 2021", "hidden states of all intermediate layers", "layers"),
    ("rail_kd", "Haidar et al. 2022", "hidden states of a random layer subset", "layers"),
    ("mgskd", "Liu et al. 2022", "hidden states (token/span/sample relations)", "layers"),
    ("lrc_bert", "Fu et al. 2021", "intermediate outputs (contrastive)", "layers"),
    ("theseus", "Xu et al. 2020", "hidden states at module boundaries", "layers"),
    ("diito", "Wu et al. 2022", "counterfactual logits (--interchange)", "layers"),
    ("tmkd", "Yang et al. 2020", "top-k logits of several teachers", "teachers"),
    ("mt_bert", "Wu et al. 2021", "logits and hidden states of several teachers", "teachers"),
    ("rl_kd", "Yuan et al. 2021", "logits and pooled hidden states of several teachers", "teachers"),
    ("uncertainty", "Li et al. 2021", "top-k logits", "teachers"),
    ("takd", "Mirzadeh et al. 2020", "a teacher-assistant chain of caches", "assistants"),
    ("dgkd", "Son et al. 2021", "caches of the teacher and all assistants", "assistants"),
    ("albert", "Lan et al. 2020", "student architecture: factorized embeddings, shared layers", "architecture"),
]


# methods that are a pipeline of extract and distill steps rather than one loss
RECIPES = {"takd": "kdpipe run examples/takd.toml",
           "albert": "a student option, with any method: --student teacher:layers=6,albert=1[,embedding=128]"}


def status(name: str, methods: dict) -> str | None:
    """'cache' when it runs from the cache (one loss; `methods` is the registry), 'recipe' when it is a
    pipeline or a student architecture, 'planned' when GKD has it and kdpipe not yet, None if unknown."""
    if name in methods:
        return "cache (adapted)" if methods[name].adapted else "cache"
    if name in RECIPES:
        return "recipe"
    return "planned" if any(row[0] == name for row in GKD_METHODS) else None


def reads_samples(cls) -> bool:
    """Whether a method trains from an importance-sampled cache (--top-k 0), with estimator=sampled."""
    return "estimator" in cls.defaults and not cls.topk_only


def table(methods: dict) -> list[dict[str, str]]:
    """One row per GKD method (and per registered method GKD does not list), from the registry `methods`."""
    rows = [{"method": n, "paper": p, "needs": s, "group": g, "status": status(n, methods),
             "adaptation": methods[n].adapted if n in methods else RECIPES.get(n, "")} for n, p, s, g in GKD_METHODS]
    extra = [{"method": n, "paper": c.paper, "needs": "token ids only (next-token cross-entropy)", "group": "labels",
              "status": "cache",
              "adaptation": ""}
             for n, c in methods.items() if not any(r["method"] == n for r in rows)]
    return rows + extra
