"""Training configuration: dataclasses loaded from `configs/*.toml`, unknown keys an error.

The dataclass defaults below are the base configuration, documented once: each field says what it
is and why its value. They are the `small` preset's values, except the precision map, whose
per-projection policy was measured at small's width and stays in `configs/small.toml`. A preset
names only what differs from the base, or from another preset it `extends` (see `load`).
Command-line overrides (--precision, --recipe, --max-steps, --run, --set) apply on top of the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
PRECISIONS = ("fp8", "te-bf16", "bf16", "fp32")
TE_MODES = ("fp8", "te-bf16")  # the modes that build Transformer Engine modules
RECIPES = ("delayed", "current", "block")
LOSSES = ("plain", "chunked")
AUTO = "auto"  # a stage's micro_batch chosen by train/microbatch.py


class ConfigError(Exception):
    """A configuration the trainer cannot run; the message says which key to change."""


@dataclass
class ModelConfig:
    d_model: int = 768  # residual width; with 12 layers, the GPT-2-small shape
    n_layers: int = 12  # transformer blocks
    n_heads: int = 12  # query heads; head dim d_model / n_heads = 64, must be even for RoPE
    n_kv_heads: int = 4  # key/value heads (grouped-query attention), divides n_heads: a third of the KV cache
    ffn_dim: int = 2048  # SwiGLU hidden width: 8/3 x d_model, so its three matrices cost a 4 x d_model MLP's two
    embed_rank: int = 0  # factorized embeddings V x r then r -> d (0: a plain V x d embedding); pays for a large V
    tie_embeddings: bool = False  # share the input embedding with the output head (saves V x d parameters)
    rope_theta: float = 10000.0  # RoPE base, the RoPE paper's; enough for the 2048-token stages
    norm_eps: float = 1e-5  # RMSNorm epsilon, Llama 2's
    # Std of the normal weight initialisation, GPT-2's; o and down are further scaled by 1/sqrt(2 * n_layers)
    # so the residual stream does not grow with depth.
    init_std: float = 0.02


@dataclass
class PrecisionConfig:
    # fp8 (Transformer Engine, GPU 8.9+) | te-bf16 (TE modules, BF16 GEMMs: a diagnostic) | bf16 | fp32.
    # fp8 is what this trainer is for; --precision overrides it per run.
    mode: str = "fp8"
    # FP8 scaling: delayed (HYBRID E4M3/E5M2 from an amax history) | current | block (1x128 activations,
    # 128x128 weights). Delayed measured fastest at small and base (docs/benchmarks.md).
    recipe: str = "delayed"
    # Delayed scaling: a tensor's scale comes from the largest amax of this many past steps. Short, so a
    # scale recovers within 16 steps of an outlier (TE's own default is 1024); not tuned here.
    amax_history: int = 16
    # Per projection: fp8 or bf16. Embeddings, norms, softmax and the loss are never FP8. The base is all FP8
    # but the head (DeepSeek-V3's policy); which GEMMs gain from FP8 depends on the width, so a preset whose
    # shapes were measured with `just bench-linear` (docs/benchmarks.md) states its own map. A file's map
    # merges key by key over this one.
    map: dict[str, str] = field(default_factory=lambda: {**dict.fromkeys(PROJECTIONS, "fp8"), "lm_head": "bf16"})
    # Fuse each pre-norm into the FP8 projections after it: Transformer Engine's LayerNormLinear (RMSNorm, then
    # q, k, v) and LayerNormMLP (RMSNorm, gate and up, SwiGLU, down), whose norm and SwiGLU write FP8 directly
    # instead of BF16 for a separate cast. The norm then reads the residual in BF16. Needs q, k, v, gate, up and
    # down all fp8 in the map; the bf16 and fp32 modes build torch norms whatever this says. Checkpoints keep
    # the unfused names, so export and sampling are unchanged. yxanul-197m: 1.02x over unfused (docs/log.md).
    fused_norms: bool = False


@dataclass
class AttentionConfig:
    # Attend only within a document (packed rows hold several); positions restart per document. Off: it cost
    # 22-30% of throughput at small and is not compiled (docs/benchmarks.md).
    doc_mask: bool = False


@dataclass
class StageConfig:
    seq_len: int  # packed length to read (data/packed/seq{N})
    tokens: int  # token budget of this stage
    # Rows per micro-batch per GPU, or "auto": the largest that fits the GPU's memory, found by a short
    # probe at the stage's shape and cached in the run folder (train/microbatch.py; on the CPU, the
    # largest up to 4,096 tokens). Either way it divides the rows of an optimizer step.
    micro_batch: int | str = AUTO


@dataclass
class OptimConfig:
    lr: float = 6e-4  # peak learning rate, GPT-3's for its 125M model
    min_lr_ratio: float = 0.1  # final lr = lr * this; decaying to 10% as GPT-3 did
    weight_decay: float = 0.1  # AdamW, on matrices only (never on norms, biases, embeddings); GPT-3's
    beta1: float = 0.9  # AdamW first-moment decay, GPT-3's
    beta2: float = 0.95  # AdamW second-moment decay, GPT-3's: steadier than 0.999 on large-batch LM training
    eps: float = 1e-8  # AdamW epsilon, GPT-3's
    grad_clip: float = 1.0  # max global grad norm (0: off); GPT-3's
    warmup_tokens: int = 50_000_000  # linear warmup over this many tokens: about 95 steps of 524,288 tokens
    schedule: str = "cosine"  # cosine (GPT-3's) | wsd (warmup, stable, then linear decay: for open-ended runs)
    decay_fraction: float = 0.2  # wsd: fraction of the tokens spent decaying
    # Tokens per optimizer step, all GPUs together, constant across stages (gradient accumulation is derived
    # per stage from the micro-batch): 2^19, about GPT-3's 0.5M for its 125M model.
    tokens_per_step: int = 524288


@dataclass
class DataConfig:
    data_dir: str = "data"  # holds packed/seq{N} and tokens/, where the pipeline writes them
    manifests: str = "manifests"  # holds tokenize.json and pack-seq{N}.json, where the pipeline writes them
    seed: int = 0  # row order of epoch e is a permutation seeded by seed + e
    verify: bool = False  # also check packed files' sha256 at start (off: slow on big data)


@dataclass
class RunConfig:
    name: str = "run"  # run directory: out_dir/NAME; each preset names its own
    out_dir: str = "runs"  # parent of the run directories
    log_every: int = 10  # optimizer steps between metric lines; each one syncs the loss to the host
    # Optimizer steps between validations (and at every stage end): 262M tokens at 524,288. An evaluated
    # step also writes a metrics line, so evaluations never wait for log_every.
    eval_every: int = 500
    eval_rows: int = 0  # validation rows per evaluation (0: the whole val split; fewer for quick runs)
    checkpoint_every: int = 1000  # optimizer steps between checkpoints (and at every stage end): every other eval
    keep_last: int = 3  # checkpoints kept besides the best (0: keep every one)
    max_bad_steps: int = 5  # consecutive NaN/Inf steps (each skipped) that stop the run: a spike passes, a streak not
    # torch.compile the model and loss on a GPU (TE projections stay eager, compiled around): FP8 small at
    # micro-batch 32 went from 347k to 476k tokens/s (docs/benchmarks.md).
    compile: bool = True
    # Replay the layer stack as CUDA graphs in training, one forward and one backward per micro-batch shape
    # (train/graphs.py): removes the launch gaps between Transformer Engine projections. Applies to the TE
    # modes on one GPU without attention.doc_mask; the run's start says when it does not apply.
    cuda_graphs: bool = True
    seed: int = 0  # model initialisation seed
    # plain: the head writes the logits, then cross-entropy in FP32 (compiled on a GPU) | chunked: the head's
    # GEMM and the loss fused per chunk of tokens, their gradients computed in the forward, so neither the
    # logits nor their gradient is ever written whole (train/loss.py); needs a torch head, not an FP8 one.
    loss: str = "plain"
    loss_chunk_tokens: int = 4096  # tokens per chunk of the chunked loss: its memory is one chunk's logits
    # Share of the GPU's memory this process may allocate (0: all of it), for micro_batch = "auto" and the
    # run alike: 0.29 of an 80 GB H100 is about a 24 GB card's usable memory.
    memory_fraction: float = 0.0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    curriculum: list[StageConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, values: Any, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        expected = known[name].type
        if name == "map":
            bad = sorted(set(value) - set(PROJECTIONS))
            if bad:
                raise ConfigError(f"unknown projection(s) {bad} in [precision.map]; known: {list(PROJECTIONS)}")
            value = {**PrecisionConfig().map, **value}
        elif expected in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}.{name} must be a number, got {value!r}")
        elif expected == "int" and isinstance(value, float):
            raise ConfigError(f"{where}.{name} must be an integer, got {value!r}")
        elif expected == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}.{name} must be true or false, got {value!r}")
        elif expected == "str" and not isinstance(value, str):
            raise ConfigError(f"{where}.{name} must be a string, got {value!r}")
        kwargs[name] = float(value) if expected == "float" else value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"[{where}]: {err}") from None


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; known: {sorted(sections)}")
    stages = raw.get("curriculum", [])
    if not isinstance(stages, list) or not stages:
        raise ConfigError("the config needs at least one [[curriculum]] stage (seq_len, tokens, micro_batch)")
    config = TrainConfig(
        model=_build(ModelConfig, raw.get("model", {}), "model"),
        precision=_build(PrecisionConfig, raw.get("precision", {}), "precision"),
        attention=_build(AttentionConfig, raw.get("attention", {}), "attention"),
        curriculum=[_build(StageConfig, s, f"curriculum.{i}") for i, s in enumerate(stages)],
        optim=_build(OptimConfig, raw.get("optim", {}), "optim"),
        data=_build(DataConfig, raw.get("data", {}), "data"),
        run=_build(RunConfig, raw.get("run", {}), "run"))
    validate(config)
    return config


def load(path: Path) -> TrainConfig:
    """Read a config file, resolving its `extends` chain, on top of the dataclass defaults.

    A top-level `extends = "other.toml"` (relative to the file) makes the file a diff: tables merge key
    by key over the parent's, `[precision.map]` included, while any other value, an array of tables
    such as `[[curriculum]]` included, replaces the parent's whole. Parents may extend in turn.
    """
    return from_dict(_resolve(Path(path), ()))


def _resolve(path: Path, children: tuple[Path, ...]) -> dict[str, Any]:
    """The raw table of `path` merged over its parents'. `children`: the files whose `extends` led here,
    the loaded one first, to name a cycle or the file that asked for a missing parent."""
    if not path.is_file():
        if children:
            raise ConfigError(f"{children[-1]}: extends {path}, which is not a file")
        raise ConfigError(f"config {path} not found; presets live in configs/ (tiny, small, yxanul-197m, base)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a file name, got {parent!r}")
    parent_path = path.parent / parent
    chain = (*children, path)
    if parent_path.resolve() in {p.resolve() for p in chain}:
        raise ConfigError(f"extends cycle: {' -> '.join(str(p) for p in (*chain, parent_path))}")
    return _merge(_resolve(parent_path, chain), raw)


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` over `parent`: tables merge key by key, recursively; any other value replaces the parent's."""
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merge(merged[key], value)
        merged[key] = value
    return merged


# The range of every numeric key, checked where a config is built (file, --set, resume): a value out of
# range is refused with its key rather than failing deep in the run (a division by zero, a loader
# thread dying on a negative seed, an optimizer raising at step 1).
POSITIVE, NON_NEGATIVE, FRACTION, BELOW_ONE = "> 0", ">= 0", "in [0, 1]", "in [0, 1)"
IN_RANGE = {POSITIVE: lambda v: v > 0, NON_NEGATIVE: lambda v: v >= 0, FRACTION: lambda v: 0 <= v <= 1,
            BELOW_ONE: lambda v: 0 <= v < 1}
RANGES = {
    "model": {"d_model": POSITIVE, "n_layers": POSITIVE, "n_heads": POSITIVE, "n_kv_heads": POSITIVE,
              "ffn_dim": POSITIVE, "embed_rank": NON_NEGATIVE, "rope_theta": POSITIVE, "norm_eps": POSITIVE,
              "init_std": POSITIVE},
    "precision": {"amax_history": POSITIVE},
    "optim": {"lr": NON_NEGATIVE, "min_lr_ratio": FRACTION, "weight_decay": NON_NEGATIVE, "beta1": BELOW_ONE,
              "beta2": BELOW_ONE, "eps": POSITIVE, "grad_clip": NON_NEGATIVE, "warmup_tokens": NON_NEGATIVE,
              "decay_fraction": FRACTION, "tokens_per_step": POSITIVE},
    "data": {"seed": NON_NEGATIVE},
    "run": {"log_every": POSITIVE, "eval_every": POSITIVE, "eval_rows": NON_NEGATIVE, "checkpoint_every": POSITIVE,
            "keep_last": NON_NEGATIVE, "max_bad_steps": POSITIVE, "seed": NON_NEGATIVE,
            "loss_chunk_tokens": POSITIVE, "memory_fraction": FRACTION},
}


def validate(config: TrainConfig) -> None:
    for section, keys in RANGES.items():
        values = getattr(config, section)
        for key, wanted in keys.items():
            if not IN_RANGE[wanted](getattr(values, key)):
                raise ConfigError(f"{section}.{key} must be {wanted}, got {getattr(values, key)!r}")
    m, p, o = config.model, config.precision, config.optim
    if m.n_heads % m.n_kv_heads or m.d_model % m.n_heads:
        raise ConfigError(f"model: n_heads ({m.n_heads}) must be a multiple of n_kv_heads ({m.n_kv_heads}) and "
                          f"divide d_model ({m.d_model})")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError("model: head dimension d_model / n_heads must be even (RoPE)")
    if p.mode not in PRECISIONS:
        raise ConfigError(f"precision.mode {p.mode!r} must be one of {PRECISIONS}")
    if p.recipe not in RECIPES:
        raise ConfigError(f"precision.recipe {p.recipe!r} must be one of {RECIPES}")
    bad = {k: v for k, v in p.map.items() if v not in ("fp8", "bf16")}
    if bad:
        raise ConfigError(f"precision.map values must be fp8 or bf16, got {bad}")
    fused = ("q", "k", "v", "gate", "up", "down")
    if p.fused_norms and p.mode in TE_MODES and any(p.map[name] != "fp8" for name in fused):
        raise ConfigError(f"precision.fused_norms builds {', '.join(fused)} as Transformer Engine modules: mark them all "
                          f"fp8 in precision.map (got { {name: p.map[name] for name in fused} }), or set "
                          f"precision.fused_norms = false")
    if o.schedule not in ("cosine", "wsd"):
        raise ConfigError(f"optim.schedule {o.schedule!r} must be cosine or wsd")
    for i, stage in enumerate(config.curriculum):
        if stage.seq_len <= 0 or stage.tokens <= 0:
            raise ConfigError(f"curriculum stage {i}: seq_len and tokens must be positive")
        m = stage.micro_batch
        if m != AUTO and (isinstance(m, bool) or not isinstance(m, int) or m <= 0):
            raise ConfigError(f'curriculum stage {i}: micro_batch must be a positive integer or "auto", got {m!r}')
    r = config.run
    if r.loss not in LOSSES:
        raise ConfigError(f"run.loss {r.loss!r} must be one of {LOSSES}")
    if r.loss == "chunked" and p.mode in TE_MODES and p.map["lm_head"] == "fp8":
        raise ConfigError('run.loss = "chunked" computes the head itself and cannot run a Transformer Engine head: '
                          'set precision.map.lm_head = "bf16", or run.loss = "plain"')


def apply_settings(config: TrainConfig, settings: list[str]) -> TrainConfig:
    """Apply `section.key=value` overrides (value in TOML syntax), e.g. optim.tokens_per_step=65536."""
    raw = config.to_dict()
    for setting in settings:
        path, sep, text = setting.partition("=")
        keys = path.strip().split(".")
        if not sep or len(keys) not in (2, 3):
            raise ConfigError(f"--set {setting!r}: expected section.key=value (curriculum.N.key=value for a stage)")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word is a string
        target = raw
        for key in keys[:-1]:
            if isinstance(target, list):
                if not key.isdigit() or int(key) >= len(target):
                    raise ConfigError(f"--set {setting!r}: the curriculum has stages 0 to {len(target) - 1}; "
                                      f"a stage is added in the config file, not with --set")
                target = target[int(key)]
            elif isinstance(target, dict):
                target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {setting!r}: {'.'.join(keys[:-1])} is not a table of keys")
        target[keys[-1]] = value
    return from_dict(raw)


def apply_overrides(config: TrainConfig, precision: str | None = None, recipe: str | None = None,
                    run_name: str | None = None) -> TrainConfig:
    if precision is not None:
        config.precision.mode = precision
    if recipe is not None:
        config.precision.recipe = recipe
    if run_name is not None:
        config.run.name = run_name
    validate(config)
    return config


# What `--resume` may change of a run, the rest being the run itself (its config.resolved.json): where
# its data is read from (the checkpoint's tokenizer is still checked against the packs) and the
# bookkeeping around the steps, which never changes what a step computes.
RESUME_ADJUSTABLE = frozenset({"data.data_dir", "data.manifests", "data.verify", "run.log_every", "run.eval_every",
                               "run.eval_rows", "run.checkpoint_every", "run.keep_last", "run.max_bad_steps"})
RUN_LOCATION = frozenset({"run.name", "run.out_dir"})  # where the run is found: never a change of it


def flatten(raw: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys: optim.lr, precision.map.q, curriculum.0.seq_len."""
    if isinstance(raw, list):
        raw = dict(enumerate(raw))
    if not isinstance(raw, dict):
        return {prefix[:-1]: raw}
    return {k: v for key, value in raw.items() for k, v in flatten(value, f"{prefix}{key}.").items()}


def resume_changes(saved: TrainConfig, requested: TrainConfig, where: Path) -> list[str]:
    """What `requested` changes of the run configured as `saved` (read from `where`), as "key old -> new";
    ConfigError when any change is not in RESUME_ADJUSTABLE."""
    old, new = flatten(saved.to_dict()), flatten(requested.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if k not in RUN_LOCATION and old.get(k) != new.get(k))
    described = {k: f"{k} {old.get(k, 'unset')!r} -> {new.get(k, 'unset')!r}" for k in changed}
    refused = [described[k] for k in changed if k not in RESUME_ADJUSTABLE]
    if refused:
        raise ConfigError(f"--resume continues the run as configured in {where}, and this command changes "
                          f"{', '.join(refused)}; drop the flags (or --config) that change it, or start a new run "
                          f"with another --run NAME (`just train --help` says what a resume may change)")
    return list(described.values())
