"""`kdpipe extract`: corpus -> token blocks -> teacher forward with capture -> teacher cache."""

from __future__ import annotations

import math
import time
from pathlib import Path

from dataclasses import dataclass, field

from tqdm import tqdm

from kdpipe.console import quiet_libraries, say
from kdpipe.capture import parse_layers
from kdpipe.errors import UserError
from kdpipe.stage1_extract.calibrate import calibrate, calibration_sequences
from kdpipe.stage1_extract.chat import check_chat_template
from kdpipe.stage1_extract.corpus import expand_sources, iter_documents, tokenize_documents
from kdpipe.stage1_extract.packing import TokenBlocks, pack
from kdpipe.stage1_extract.engines import Ranks, load_deepspeed_teacher
from kdpipe.stage1_extract.logits import LogitSpec, head_transform
from kdpipe.stage1_extract.probe import probe
from kdpipe.stage1_extract.runner import UnitRunner
from kdpipe.stage1_extract.teacher import (configure_threads, describe_teacher, describe_tokenizer, load_teacher,
                                           check_tokenizer, load_tokenizer, resolve_teacher, saved_files,
                                           weights_fingerprint)
from kdpipe.storage import budget
from kdpipe.storage.budget import Shapes
from kdpipe.storage.codes import read_codecs, read_signal_rows
from kdpipe.storage.manifest import DataInfo, EngineInfo, Layout, Manifest, SignalSpec, stored_temperatures
from kdpipe.storage.schema import array_specs, unit_range
from kdpipe.storage.sampled_codec import CODEC as SAMPLED_CODEC
from kdpipe.storage.topk_codec import CODEC, ERROR_BOUND
from kdpipe.modelio import check_device, gguf_parsed_once, load_config, release_gguf_readers
from kdpipe.storage.lock import DirectoryLock, describe
from kdpipe.storage.writer import (UnitWriter, check_out, finalize, open_store, prepare_store, read_manifest,
                                   units_done)


@dataclass
class ExtractConfig:
    teacher: str
    data: list[str]
    out: str
    tokenizer: str | None = None
    text_field: str = "text"
    messages_field: str | None = None  # chat records: rendered with the chat template, assistant tokens learned
    learn_all_tokens: bool = False  # chat: every token is learned, not only the assistant's
    seq_len: int = 256
    packing: str = "packed"
    keep_tail: bool = False  # packed: keep the corpus tail that does not fill a block, padded
    batch_size: int = 8
    top_k: int = 64
    logit_codec: str = "compact"  # ranked ids and 8-bit log-probabilities (storage.topk_codec), or "float16"
    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0])
    sample_count: int = 0
    sample_temperature: float = 1.0
    sample_logprobs: bool = True  # the drawn ids' log-probabilities: weights for other temperatures
    sampler: str = "systematic"  # or "multinomial" (stage1_extract.logits.systematic_draws)
    seed: int = 0
    hidden_layers: str = "none"
    hidden_dtype: str = "float16"
    hidden_keepbits: int | None = None
    attention_layers: str = "none"
    attention_form: str = "factors"
    attention_dtype: str = "float16"
    interchange_layers: str = "none"
    interchange_rate: float = 0.3
    # compressed hidden states and attention (storage.signal_codec): a budget in bytes per token for both
    # together (storage.budget chooses the settings), or the settings themselves
    signal_budget: float | None = None
    hidden_codec: str = "float16"  # or "int8"
    hidden_rank: int = 0  # int8: project to this many dimensions (0: all)
    attention_codec: str = "float16"  # factors: or "int8"
    attention_rank: int = 0  # int8 factors: project each head to this many dimensions (0: all)
    signal_fraction: float = 1.0  # of each work unit's sequences, those that carry hidden states and attention
    position_fraction: float = 1.0  # of each sequence's positions, those that do (a stratified draw per sequence)
    position_spans: int = 0  # those positions as this many contiguous spans (0: one position per stratum)
    dtype: str = "float32"
    device: str = "cpu"
    engine: str = "hf"
    offload: str = "cpu"
    nvme_path: str | None = None
    deepspeed: str | None = None
    max_sequences: int | None = None
    sequences_per_unit: int = 16
    sequences_per_chunk: int | None = None
    logit_rows: int = 512
    trust_remote_code: bool = False
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False


@dataclass
class ExtractResult:
    path: str
    manifest: Manifest
    sequences_written: int
    tokens_written: int
    seconds: float
    complete: bool

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_written / self.seconds if self.seconds > 0 else float("nan")


def _check_options(cfg: ExtractConfig) -> None:
    checks = [
        (cfg.seq_len > 0, "--seq-len must be positive"),
        (cfg.batch_size > 0, "--batch-size must be positive"),
        (cfg.top_k >= 0, "--top-k must be 0 or more"),
        (cfg.logit_codec in ("compact", "float16"), "--logit-codec must be compact or float16"),
        (cfg.top_k > 0 or cfg.sample_count > 0, "--top-k 0 keeps no top-k logits: add --sample-count M (an "
                                                "importance-sampled cache, e.g. --sample-count 12), or --top-k 64"),
        (cfg.top_k > 0 or cfg.interchange_layers in ("none", ""), "--interchange caches a counterfactual top-k: "
                                                                   "use it with --top-k 1 or more"),
        (all(t > 0 for t in cfg.temperatures) and cfg.temperatures, "--temperatures must be positive numbers"),
        (cfg.sample_count >= 0 and cfg.sample_count < 65536, "--sample-count must be in 0..65535"),
        (cfg.sample_temperature > 0, "--sample-temperature must be positive"),
        (cfg.sample_logprobs or cfg.sample_count > 0, "--no-sample-logprobs leaves out the draws' log-probabilities: "
                                                       "it needs --sample-count M"),
        (cfg.sampler in ("systematic", "multinomial"), "--sampler must be systematic or multinomial"),
        (cfg.sequences_per_unit > 0, "--sequences-per-unit must be positive"),
        (cfg.sequences_per_chunk is None or (cfg.sequences_per_chunk > 0
                                             and cfg.sequences_per_unit % cfg.sequences_per_chunk == 0),
         "--sequences-per-chunk must divide --sequences-per-unit"),
        (0 < cfg.interchange_rate <= 1, "--interchange-rate must be in (0, 1]"),
        (cfg.hidden_keepbits is None or 1 <= cfg.hidden_keepbits <= 10, "--hidden-keepbits must be in 1..10"),
        (cfg.signal_budget is None or cfg.signal_budget > 0, "--signal-budget must be positive, e.g. 8KB"),
        (cfg.signal_budget is None or (cfg.hidden_codec, cfg.hidden_rank, cfg.attention_codec, cfg.attention_rank,
                                       cfg.signal_fraction, cfg.position_fraction) == ("float16", 0, "float16", 0,
                                                                                        1.0, 1.0),
         "--signal-budget chooses --hidden-codec, --hidden-rank, --attention-codec, --attention-rank, "
         "--signal-fraction and --position-fraction: give the budget or those, not both"),
        (cfg.hidden_codec in ("float16", "int8") and cfg.attention_codec in ("float16", "int8"),
         "--hidden-codec and --attention-codec are float16 or int8"),
        (cfg.hidden_rank >= 0, "--hidden-rank must be 0 (every channel) or more"),
        (cfg.attention_rank >= 0, "--attention-rank must be 0 (every dimension) or more"),
        (0 < cfg.signal_fraction <= 1, "--signal-fraction must be in (0, 1]"),
        (0 < cfg.position_fraction <= 1, "--position-fraction must be in (0, 1]"),
        (cfg.position_spans >= 0 and (cfg.position_spans == 0 or cfg.position_fraction < 1),
         "--position-spans groups the positions --position-fraction keeps: give both, or neither"),
        (cfg.attention_codec == "float16" or cfg.attention_form == "factors",
         "--attention-codec int8 codes Q/K/V factors: for --attention-form probs use --attention-dtype uint8"),
        (cfg.hidden_keepbits is None or (cfg.hidden_codec == "float16" and not cfg.hidden_rank),
         "--hidden-keepbits rounds float16 hidden states: leave it out with --hidden-codec int8 or --hidden-rank"),
        (cfg.engine in ("hf", "deepspeed"), f"engine {cfg.engine!r} is not available: use --engine hf or deepspeed"),
        (cfg.offload in ("cpu", "nvme"), "--offload must be cpu or nvme"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other: pick one"),
        (cfg.logit_rows > 0, "--logit-rows must be positive (positions projected to the vocabulary at once)"),
        (cfg.max_sequences is None or cfg.max_sequences > 0, "--max-sequences must be positive (leave it out for all)"),
        (cfg.nvme_path is None or cfg.offload == "nvme", "--nvme-path goes with --offload nvme"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_device(cfg.device, allow_auto=cfg.engine == "hf")


def extract(cfg: ExtractConfig, model=None, tokenizer=None) -> ExtractResult:
    """Run the teacher over the corpus into the cache at `cfg.out`. A caller that already holds the teacher
    (and its tokenizer) passes them in; `cfg.teacher` then only names it in the manifest."""
    _check_options(cfg)
    # everything a user can get wrong about paths is checked before any model or tokenizer loads
    source = resolve_teacher(cfg.teacher)
    files = expand_sources(cfg.data)
    check_out(cfg.out, cfg.resume, cfg.overwrite)
    with gguf_parsed_once():  # a .gguf teacher's config, tokenizer and weights from one parse of its metadata
        _check_against_config(cfg, load_config(source, cfg.trust_remote_code))
        configure_threads()
        if cfg.quiet:
            quiet_libraries()
        ranks = Ranks.from_env(cfg.device, needed=cfg.engine == "deepspeed")
        lock = DirectoryLock(cfg.out, "teacher cache")
        ranks.first(lock.acquire)  # one writer per store: rank 0 holds its lock
        try:
            if lock.took_over:
                say(f"took over the lock of {describe(lock.took_over)}, which is no longer running")
            return _extract(cfg, source, files, ranks, model, tokenizer)
        finally:
            lock.release()


def _extract(cfg: ExtractConfig, source, files, ranks: Ranks, model, tokenizer) -> ExtractResult:
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer, source, cfg.trust_remote_code)
    if cfg.tokenizer:
        check_tokenizer(tokenizer, source, cfg.tokenizer, cfg.trust_remote_code)
    if cfg.messages_field is not None:
        check_chat_template(tokenizer)  # before the teacher loads
    engine = EngineInfo(name=cfg.engine, device=cfg.device, world_size=ranks.world)
    if cfg.engine == "deepspeed":
        engine.zero_stage, engine.offload = 3, cfg.offload
        if model is None:
            model, _ = load_deepspeed_teacher(source, cfg.dtype, cfg.device, cfg.offload, cfg.nvme_path,
                                              cfg.deepspeed, cfg.trust_remote_code)
    model = model or load_teacher(source, cfg.dtype, cfg.device, cfg.trust_remote_code)
    release_gguf_readers()
    manifest, tokens, (chosen, shapes) = _plan(cfg, source, model, tokenizer, files, engine)
    if cfg.signal_budget is not None and ranks.rank == 0:
        sizes = budget.bytes_per_token(chosen, shapes)
        say(f"--signal-budget {cfg.signal_budget:,.0f} B/token: {chosen.describe(shapes)}; "
            f"{sum(sizes.values()):,.0f} B/token of hidden states and attention before compression (exact: "
            f"{sum(budget.bytes_per_token(budget.Settings(), shapes).values()):,.0f})")
    try:
        return _run(cfg, ranks, model, tokenizer, manifest, tokens)
    finally:
        tokens.close()


def _run(cfg: ExtractConfig, ranks: Ranks, model, tokenizer, manifest: Manifest,
         tokens: TokenBlocks) -> ExtractResult:
    lengths = tokens.lengths
    tokenizer_files = saved_files(tokenizer)
    manifest.tokenizer.files = {name: len(data) for name, data in tokenizer_files.items()}
    scale, softcap = head_transform(model)
    spec = LogitSpec(top_k=cfg.top_k, temperatures=manifest.signals.temperatures,
                     vocab_size=manifest.teacher.vocab_size, rows=cfg.logit_rows, sample_count=cfg.sample_count,
                     sample_temperature=cfg.sample_temperature, sampler=cfg.sampler, seed=cfg.seed, scale=scale,
                     softcap=softcap)
    s = manifest.signals
    checked = probe(model, spec, tokens[0], int(lengths[0]), s.attention_layers, s.attention_form, cfg.dtype)
    s.attention_windows, s.attention_softcap = checked.windows, checked.softcap
    if s.attention_layers:
        s.attention_scaling = checked.scaling  # what the model's attention calls really use, read off them

    runner = UnitRunner(model, manifest, spec, cfg.batch_size)
    # A new store is calibrated on unit 0's first batches (stage1_extract.calibrate), by every rank, since
    # ZeRO-3 keeps their forwards in step; rank 0 fits and stores the codes, and those batches become its
    # unit 0's first ones. A resumed store keeps the codes it was written with.
    fresh = ranks.share(cfg.overwrite or read_manifest(cfg.out) is None if ranks.rank == 0 else None)
    calibrating = time.perf_counter()  # its forwards and fit count in the extraction's time; creating the store not
    count = calibration_sequences(manifest) if fresh else 0
    s0, s1 = unit_range(manifest, 0)
    held = runner.calibration_batches(tokens[s0:s1], lengths[s0:s1], range(s0, s1), count) if count else []
    calibration = calibrate(manifest, held, tokens, lengths, runner.device) if held and ranks.rank == 0 else None
    if calibration is not None:
        s.hidden_error, s.attention_error = calibration.hidden_error, calibration.attention_error
    calibration_seconds = time.perf_counter() - calibrating

    # rank 0 creates (or reopens) the store; the others open it once it exists, and all fail together
    group = ranks.first(lambda: prepare_store(cfg.out, manifest, tokens, lengths, cfg.resume, cfg.overwrite,
                                              tokenizer_files, tokens.masks if tokens.has_loss_mask else None,
                                              calibration.codecs if calibration else None))
    group = group if ranks.rank == 0 else open_store(cfg.out)
    # what the store holds, for every rank
    runner.use(read_codecs(group, manifest, cfg.out), read_signal_rows(group, manifest, cfg.out))
    pending = [u for u, done in enumerate(units_done(group)) if not done]
    mine = pending[ranks.rank::ranks.world]
    reuse = held if mine[:1] == [0] else []  # unit 0's owner encodes the calibration batches; the others drop them

    writer = UnitWriter(group, cfg.out, manifest=manifest)
    passes = 2 if manifest.signals.interchange_layers else 1  # a counterfactual forward per batch
    batches = [_batches(manifest, pending[r::ranks.world], cfg.batch_size) for r in range(ranks.world)]
    # forwards each rank makes from here, counting the calibration's as unit 0's: the others ran them extra
    forwards = [passes * b + (len(held) if r != 0 else 0) for r, b in enumerate(batches)]
    total_tokens = sum(int(lengths[slice(*unit_range(manifest, u))].sum()) for u in mine)
    written_seqs = written_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=f"extract{ranks.label}",
               disable=cfg.quiet, dynamic_ncols=True, position=ranks.rank)
    try:
        for unit in mine:
            s0, s1 = unit_range(manifest, unit)
            writer.submit(unit, s0, runner.unit(tokens[s0:s1], lengths[s0:s1], range(s0, s1), bar,
                                                reuse if unit == 0 else ()))
            written_seqs += s1 - s0
            written_tokens += int(lengths[s0:s1].sum())
        if cfg.engine == "deepspeed":
            for _ in range(max(forwards) - forwards[ranks.rank]):
                runner.idle_forward(tokens)
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - start + calibration_seconds
    ranks.barrier()
    complete = finalize(group) if ranks.rank == 0 else False
    manifest.complete = ranks.share(complete)
    return ExtractResult(cfg.out, manifest, written_seqs, written_tokens, seconds, manifest.complete)


def _check_against_config(cfg: ExtractConfig, config) -> None:
    """The settings that depend on the teacher's shape, from its config alone: before its weights load."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, vocab = getattr(text, "num_hidden_layers", None), getattr(text, "vocab_size", None)
    positions = next((v for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
                      if isinstance(v := getattr(text, k, None), int) and v > 0), None)
    check_shape(cfg, layers, vocab, positions)


def check_shape(cfg: ExtractConfig, layers: int | None, vocab: int | None, positions: int | None) -> None:
    if positions and cfg.seq_len > positions:
        raise UserError(f"--seq-len {cfg.seq_len} is longer than the teacher's {positions} positions: lower --seq-len")
    if vocab and cfg.top_k > vocab:
        raise UserError(f"--top-k {cfg.top_k} is larger than the vocabulary ({vocab}): lower --top-k")
    if layers:
        parse_layers(cfg.hidden_layers, layers, 0, "hidden")
        parse_layers(cfg.attention_layers, layers, 1, "attention")
        parse_layers(cfg.interchange_layers, layers - 1, 1, "interchange")


def _plan(cfg: ExtractConfig, source, model, tokenizer, files, engine: EngineInfo):
    """Check the settings against the teacher, pack the corpus, and write down the manifest."""
    teacher = describe_teacher(model, source.name, cfg.dtype, weights_fingerprint(source))
    if not teacher.causal:
        raise UserError(f"{teacher.architecture} is an encoder (it attends to later tokens): kdpipe distills causal "
                        f"decoders, whose students predict the next token; a bidirectional teacher's signals would "
                        f"let the student see the future")
    check_shape(cfg, teacher.num_layers, teacher.vocab_size, teacher.max_positions)
    if len(tokenizer) > teacher.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the teacher only {teacher.vocab_size} "
                        f"logits: pass the teacher's own --tokenizer")
    hidden_layers = parse_layers(cfg.hidden_layers, teacher.num_layers, 0, "hidden")
    attention_layers = parse_layers(cfg.attention_layers, teacher.num_layers, 1, "attention")
    interchange_layers = parse_layers(cfg.interchange_layers, teacher.num_layers - 1, 1, "interchange")

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    chat = cfg.messages_field is not None
    docs = iter_documents(files, cfg.messages_field if chat else cfg.text_field, "messages" if chat else "text")
    tokens, dropped = pack(tokenize_documents(docs, tokenizer, learn_all=cfg.learn_all_tokens), cfg.seq_len, eos,
                           cfg.packing, pad, cfg.max_sequences, cfg.keep_tail, spool_dir=_spool_dir(cfg.out),
                           unk_id=tokenizer.unk_token_id)
    lengths = tokens.lengths
    if tokenizer.unk_token_id is not None:
        share = tokens.unknown_tokens / max(1, int(lengths.sum()))
        if share > 0.05:
            say(f"{share:.1%} of the corpus tokenized to the unknown token {tokenizer.unk_token!r}: check that the "
                f"tokenizer is the teacher's own, and that --data is text it knows")
    n = len(tokens)

    per_unit = cfg.sequences_per_unit
    compact = cfg.logit_codec == "compact" and cfg.top_k > 0
    compact_sampled = cfg.logit_codec == "compact" and cfg.sample_count > 0
    shapes = Shapes(teacher.hidden_size, len(hidden_layers), len(attention_layers), teacher.num_heads,
                    teacher.num_kv_heads, teacher.head_dim, cfg.seq_len,
                    cfg.attention_form if attention_layers else None, per_unit)
    chosen = budget.fit(cfg.signal_budget, shapes) if cfg.signal_budget is not None else \
        budget.from_flags(cfg.hidden_codec, cfg.hidden_rank, cfg.attention_codec, cfg.attention_dtype,
                          cfg.signal_fraction, shapes, cfg.position_fraction, cfg.attention_rank)
    if chosen.signal_positions and cfg.position_spans > chosen.signal_positions:
        raise UserError(f"--position-spans {cfg.position_spans} is more than the {chosen.signal_positions} positions "
                        f"--position-fraction keeps of each sequence: lower it (0: one position per stratum)")
    manifest = Manifest(
        teacher=teacher,
        tokenizer=describe_tokenizer(tokenizer, cfg.tokenizer or source.name),
        data=DataInfo(sources=[str(f) for f in files], seq_len=cfg.seq_len, num_sequences=n, packing=cfg.packing,
                      fingerprint=tokens.fingerprint, num_tokens=int(lengths.sum()), dropped_tokens=dropped,
                      loss_mask=("all" if cfg.learn_all_tokens else "assistant") if chat else None,
                      learned_tokens=int(tokens.learned_tokens) if chat else None),
        signals=SignalSpec(top_k=cfg.top_k,
                           temperatures=stored_temperatures(cfg.temperatures, cfg.top_k, cfg.sample_logprobs,
                                                            cfg.sample_temperature),
                           sample_count=cfg.sample_count, sample_temperature=cfg.sample_temperature,
                           sampler=cfg.sampler, seed=cfg.seed,
                           logtail=True, sampled_logprobs=bool(cfg.sample_count) and cfg.sample_logprobs,
                           topk_codec=CODEC if compact else "float16", topk_error=ERROR_BOUND if compact else 0.0,
                           sampled_codec=SAMPLED_CODEC if compact_sampled else "raw",
                           hidden_layers=hidden_layers, hidden_dtype=cfg.hidden_dtype,
                           hidden_keepbits=cfg.hidden_keepbits, attention_layers=attention_layers,
                           attention_form=cfg.attention_form if attention_layers else None,
                           attention_dtype=chosen.attention_dtype, interchange_layers=interchange_layers,
                           interchange_rate=cfg.interchange_rate if interchange_layers else 0.0,
                           hidden_codec=chosen.hidden_codec, hidden_rank=chosen.hidden_rank,
                           attention_codec=chosen.attention_codec, attention_rank=chosen.attention_rank,
                           signal_sequences=chosen.signal_sequences,
                           signal_positions=chosen.signal_positions,
                           position_spans=cfg.position_spans if chosen.signal_positions else 0,
                           signal_budget=cfg.signal_budget),
        layout=Layout(sequences_per_unit=per_unit, sequences_per_chunk=cfg.sequences_per_chunk or per_unit,
                      num_units=math.ceil(n / per_unit)),
        engine=engine,
        # a kdpipe before 0.3 reads neither the compact top-k nor compressed signals, one before 0.4 no positions,
        # one before 0.5 no compact draws, one before 0.7 no projected attention: it says to upgrade
        version=5 if chosen.attention_rank else 4 if compact_sampled else 3 if chosen.signal_positions else
        2 if compact or chosen != budget.Settings(attention_dtype=chosen.attention_dtype) else 1,
    )
    manifest.layout.codecs = {spec.name: spec.preset for spec in array_specs(manifest)}
    return manifest, tokens, (chosen, shapes)


def _spool_dir(out: str) -> str | None:
    """The packed corpus waits beside the store (a disk sized for it), not in a small /tmp."""
    parent = Path(out).expanduser().resolve().parent
    return str(parent) if parent.is_dir() else None


def _batches(manifest: Manifest, units: list[int], batch_size: int) -> int:
    return sum(math.ceil((b - a) / batch_size) for a, b in (unit_range(manifest, u) for u in units))
