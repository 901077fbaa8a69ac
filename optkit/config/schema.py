"""Structured config schema for optkit (Hydra / OmegaConf).

Every field a YAML file under ``conf/`` may set is declared here, so a typo such as
``train.batchsize=4`` fails at composition time with the list of valid keys instead of being
silently ignored. YAML files hold values only; checks live in ``__post_init__`` / ``validate``.

The choice lists come from the modules that implement each choice (models, families, data, train), so a
new optimizer or checkpointing mode is valid here the moment it exists there. Hydra itself appears only
in config/ and the runner: ``register_configs`` puts these schemas in its ConfigStore.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from optkit.data import LENGTH_DISTS
from optkit.data import SOURCES as DATA_SOURCES
from optkit.families import FAMILIES
from optkit.models import DTYPES
from optkit.train.checkpointing import MODES as CHECKPOINTING
from optkit.train.distributed import MODES as DISTRIBUTED
from optkit.train.method import ADAPTER_DTYPES
from optkit.train.method import METHODS as TRAIN_METHODS
from optkit.train.optimizers import OPTIMIZERS

DEVICES = ("auto", "cuda", "cpu")  # bench.device
SUITE_KINDS = ("training", "kernels", "fit")  # what a suite's points measure; the runner picks the scenario by it
FIT_SEARCHES = ("seq_len", "batch_size")  # suite.fit.searches: the variable each fit search bisects
CARD_MODES = ("cap_and_ballast", "ballast", "cap")  # bench.card_mode (optkit/bench/card.py says what each misses)
RETRY = ("none", "failed")  # bench.retry
COMPILE_SCOPES = ("model", "layers")  # opt.compile_scope (optkit/opt/peers.py compiles either)


def _check_choice(field_name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field_name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def setting(default: Any = None, meaning: str = "", *, choices=None, minimum=None, factory=None):
    """A schema field with its one-line meaning (``optkit bench --help`` prints it), and optionally its valid
    choices or lower bound (``check_fields`` enforces them, the help lists them)."""
    metadata = {"help": meaning, "choices": tuple(choices) if choices is not None else None, "minimum": minimum}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_fields(node: Any, prefix: str) -> None:
    """Every field's declared choices and lower bound; ``prefix`` names the node (``train``, ``opt.kernels``)."""
    for spec in fields(node):
        value = getattr(node, spec.name)
        if value is None:
            continue
        if spec.metadata.get("choices") is not None:
            _check_choice(f"{prefix}.{spec.name}", value, spec.metadata["choices"])
        minimum = spec.metadata.get("minimum")
        if minimum is not None and value < minimum:
            raise ValueError(f"{prefix}.{spec.name} must be >= {minimum}, got {value}")


@dataclass
class ModelConfig:
    """Which model to build. Shapes come from ``hf_config``; weights are random unless ``path``."""

    name: str = setting("tiny_llama", "zoo name: the YAML file in conf/model/; labels the rows")
    family: str = setting("llama", "model family (the HF classes to build)", choices=FAMILIES)
    hf_config: Dict[str, Any] = setting(meaning="kwargs of the family's HF config class (the shape)", factory=dict)
    path: Optional[str] = setting(None, "local checkpoint directory (config.json + weights); overrides hf_config")
    num_layers: Optional[int] = setting(None, "cut the model to this many decoder layers (null: all)", minimum=1)
    dtype: str = setting("bfloat16", "parameter and compute dtype", choices=DTYPES)
    attn_implementation: str = setting("sdpa", "HF attention: eager | sdpa | flex_attention")
    experts_implementation: Optional[str] = setting(None, "HF MoE experts: eager | grouped_mm | batched_mm")

    def __post_init__(self) -> None:
        check_fields(self, "model")


@dataclass
class KernelsConfig:
    """optkit's Triton kernels, each swapped into the model by the patcher."""

    rms_norm: bool = setting(False, "RMSNorm modules -> optkit.kernels.rms_norm")
    rope: bool = setting(False, "rotary embedding application -> optkit.kernels.apply_rotary")
    swiglu: bool = setting(False, "MLP activation silu(gate)*up -> optkit.kernels.swiglu")
    geglu: bool = setting(False, "MLP activation gelu(gate)*up (Gemma) -> optkit.kernels.geglu")
    cross_entropy: bool = setting(False, "loss on materialized logits -> optkit.kernels.cross_entropy")
    fused_linear_cross_entropy: bool = setting(False, "LM head + loss fused, logits never materialized")


@dataclass
class OptConfig:
    """An optimization set. ``name`` labels result rows; every switch is independent."""

    name: str = setting("baseline", "opt-set name: labels the rows")
    kernels: KernelsConfig = setting(meaning="optkit's Triton kernels", factory=KernelsConfig)
    fused_lora: bool = setting(False, "fused LoRA autograd functions (MLP, QKV, O)")
    fused_lora_grouped_gemm: bool = setting(False, "fused LoRA: Q/K/V and gate/up base GEMMs as one each (QLoRA too)")
    recompute_skips_mlp_down: bool = setting(
        False, "fused LoRA under checkpointing: a layer's recompute skips the MLP down_proj whose output it discards"
    )
    packed_metadata_cache: bool = setting(False, "packed sequences: boundary metadata built once per batch")
    moe_sorted_routing: bool = setting(False, "MoE: one sort + grouped GEMM instead of a per-expert loop")
    compile: bool = setting(False, "torch.compile the model (peer; composes with optkit's kernels)")
    compile_mode: Optional[str] = setting(None, "torch.compile mode (null: default)")
    liger: bool = setting(False, "Liger-Kernel's own patching (peer; a skipped row when not installed)")
    tiled_mlp: bool = setting(False, "long sequences: the MLP runs over token chunks, recomputed in backward")
    tiled_mlp_chunk_tokens: int = setting(4096, "tiled_mlp: tokens per chunk (fewer tokens: one chunk)", minimum=1)
    compile_scope: str = setting(
        "model",
        "what opt.compile wraps: model (the whole model, as HF Trainer's torch_compile) | layers (each decoder "
        "layer, as torchtitan: checkpointed layers compiled too, attention causal without a mask)",
        choices=COMPILE_SCOPES,
    )
    adapter_dtype: str = setting(
        "float32",
        "LoRA adapter weights: float32 (peft's default upcast: LoRA math in fp32) | model (the model's dtype: "
        "peft's autocast_adapter_dtype=False)",
        choices=ADAPTER_DTYPES,
    )
    unsloth: bool = setting(False, "peer: Unsloth's own FastLanguageModel path in its own process (needs a GPU)")

    def __post_init__(self) -> None:
        check_fields(self, "opt")
        others = [name for name, on in _switches(self) if on and name != "unsloth"]
        if self.unsloth and (others or self.adapter_dtype != "float32"):
            extra = others + (["adapter_dtype"] if self.adapter_dtype != "float32" else [])
            raise ValueError(
                f"opt.unsloth runs Unsloth's own path alone (it builds the model and its adapters): switch off "
                f"{', '.join('opt.' + name for name in extra)}"
            )


def _switches(node: Any, prefix: str = ""):
    """(dotted name, value) of every boolean switch of an OptConfig, nested groups (kernels) included."""
    for spec in fields(node):
        value = getattr(node, spec.name)
        if isinstance(value, bool):
            yield prefix + spec.name, value
        elif hasattr(value, "__dataclass_fields__"):
            yield from _switches(value, f"{prefix}{spec.name}.")


@dataclass
class TrainConfig:
    """The training step that is measured."""

    method: str = setting("lora", "what is trained", choices=TRAIN_METHODS)
    lora_r: int = setting(16, "LoRA rank", minimum=1)
    lora_alpha: int = setting(32, "LoRA alpha (the adapter's scale is alpha / r)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA input")
    lora_targets: List[str] = setting(
        meaning="module names that get LoRA adapters ('experts': MoE expert weights)",
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    qlora_quant_type: str = setting("nf4", "bitsandbytes 4-bit type of QLoRA's base weights", choices=("nf4", "fp4"))
    qlora_double_quant: bool = setting(True, "quantize QLoRA's quantization constants too")
    optimizer: str = setting("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = setting(1e-4, "learning rate")
    weight_decay: float = setting(0.0, "weight decay")
    checkpointing: str = setting("none", "gradient checkpointing", choices=CHECKPOINTING)
    distributed: str = setting(
        "none", "none | ddp | fsdp2 over bench.gpus processes (optkit/train/distributed.py)", choices=DISTRIBUTED
    )
    sharded_init: bool = setting(
        False, "fsdp2: build on the meta device, shard, init each rank's shards (no GPU holds the whole model)"
    )
    batch_size: int = setting(2, "rows per step per process (global batch: batch_size x bench.gpus)", minimum=1)
    warmup_steps: int = setting(3, "untimed steps first (compilation, autotuning); in no statistic", minimum=0)
    steps: int = setting(10, "timed steps per measurement window", minimum=1)
    seed: int = setting(0, "seed of the weights and the data")

    def __post_init__(self) -> None:
        check_fields(self, "train")
        if self.sharded_init and (self.distributed != "fsdp2" or self.method == "qlora"):
            raise ValueError(
                "train.sharded_init builds a model for FSDP2 from random weights: it needs train.distributed=fsdp2 "
                "and train.method lora or full (QLoRA quantizes each layer as it is built instead)"
            )


@dataclass
class DataConfig:
    """Token batches: synthetic (seeded random) or learnable (deterministic, for convergence)."""

    source: str = setting("synthetic", "where tokens come from", choices=DATA_SOURCES)
    seq_len: int = setting(512, "tokens per row", minimum=1)
    packing: bool = setting(False, "padding-free packed rows of variable-length examples")
    length_dist: str = setting("fixed", "lengths of the examples before packing", choices=LENGTH_DISTS)
    min_len: int = setting(16, "uniform length distribution: shortest example", minimum=1)
    max_len: int = setting(512, "uniform length distribution: longest example", minimum=1)
    lengths_csv: Optional[str] = setting(None, "empirical length histogram (null: the one in optkit/data)")
    pad_fraction: float = setting(0.0, "unpadded path: share of each row that is padding, in [0, 1)")

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if not 0.0 <= self.pad_fraction < 1.0:
            raise ValueError(f"data.pad_fraction must be in [0, 1), got {self.pad_fraction}")


@dataclass
class FitConfig:
    """suite.kind=fit: per cell (the axes' product, crossed with ``points``), bisect the largest value of each
    search's variable that fits, over real measured points (each its own process, each a row)."""

    searches: List[str] = setting(
        meaning="seq_len: largest data.seq_len at batch 1 | batch_size: largest train.batch_size at batch_seq_len",
        factory=lambda: list(FIT_SEARCHES),
    )
    seq_len_min: int = setting(512, "seq_len search: smallest length tried", minimum=1)
    seq_len_max: int = setting(524288, "seq_len search: largest length tried", minimum=1)
    seq_len_step: int = setting(512, "seq_len search: lengths are multiples of it (the answer's resolution)", minimum=1)
    batch_seq_len: int = setting(2048, "batch_size search: tokens per row", minimum=1)
    batch_min: int = setting(1, "batch_size search: smallest batch tried", minimum=1)
    batch_max: int = setting(256, "batch_size search: largest batch tried", minimum=1)
    rel_tol: float = setting(0.0, "stop once failure and fit are within this share of the fit (0: one step)")
    growth: float = setting(2.0, "factor between probes while no failure (or no fit) bounds the search yet")
    confirm: bool = setting(True, "probe the answer again; a second try that fails moves the search down")
    start_from_smaller_card: bool = setting(True, "a bigger card's search starts at a smaller card's answer")
    seq_len_start: Dict[str, int] = setting(
        meaning="bench.card -> first seq_len probed on it (rounded up to the step), e.g. a published figure to beat",
        factory=dict,
    )
    use_seq_len_start: bool = setting(True, "start at seq_len_start (a stack far below the figures sets false)")
    max_probes: int = setting(
        64, "probes per search; fewer stop early (bench.resume with more goes on from the recorded ones)", minimum=1
    )
    check_ballast_on: List[str] = setting(
        meaning="bench.card values whose answer is probed again with bench.card_mode=ballast (the honesty check)",
        factory=list,
    )

    def __post_init__(self) -> None:
        check_fields(self, "suite.fit")
        for name in self.searches:
            _check_choice("suite.fit.searches", name, FIT_SEARCHES)
        if self.growth <= 1.0:
            raise ValueError(f"suite.fit.growth must be > 1, got {self.growth}")


@dataclass
class SuiteConfig:
    """A sweep: the cartesian product of ``axes`` (override key -> values), plus ``points``.

    Each expanded point is a list of Hydra overrides run in its own subprocess. ``opt: [ablation]``
    expands into baseline, full, each optimization alone on and each alone off (from the registry).
    """

    name: str = setting("none", "suite name (none: the one point the other groups define)")
    description: str = setting("", "what the suite measures (optkit list prints it)")
    kind: str = setting(
        "training",
        "training: points of training steps | kernels: per-op timings | fit: largest fitting seq_len / batch",
        choices=SUITE_KINDS,
    )
    axes: Dict[str, List[Any]] = setting(meaning="override key -> values; the points are their product", factory=dict)
    fixed: Dict[str, Any] = setting(meaning="overrides applied to every point", factory=dict)
    points: List[Dict[str, Any]] = setting(meaning="extra explicit points (override key -> value)", factory=list)
    baseline_opt: str = setting("baseline", "the opt-set speedups are computed against")
    requires_cuda: bool = setting(False, "the suite measures a GPU: refused on a machine without CUDA")
    fit: FitConfig = setting(meaning="kind=fit: the searches and their ranges", factory=FitConfig)

    def __post_init__(self) -> None:
        check_fields(self, "suite")


@dataclass
class BenchConfig:
    """How points are run and measured."""

    device: str = setting("auto", "where points run (auto: cuda when visible)", choices=DEVICES)
    results_dir: str = setting("results", "rows go to <results_dir>/<gpu>/<suite>/<run_id>/")
    run_id: Optional[str] = setting(None, "name of a new run (null: <suite>-<yyyymmdd>-<sha7>)")
    resume: Optional[str] = setting(None, "finish this run: its finished points are not measured again")
    retry: str = setting("none", "with bench.resume, failed: re-measure error and timeout rows", choices=RETRY)
    timeout_s: int = setting(1800, "seconds one point may run before it is killed (a timeout row)", minimum=1)
    nvml_interval_ms: float = setting(10.0, "NVML sampling interval")
    peak_tflops: Optional[float] = setting(None, "the GPU's dense bf16 peak for MFU (null: from the GPU table)")
    repeats: int = setting(1, "measurement windows per point", minimum=1)
    isolate_repeats: bool = setting(False, "each window in its own process (process-to-process spread)")
    profile: bool = setting(False, "a torch.profiler trace of one extra step after the timed ones")
    count_syncs: bool = setting(False, "count device->host syncs in one extra untimed step")
    progress: bool = setting(True, "one line per point on stderr")
    card: Optional[str] = setting(None, "emulate a smaller GPU's memory: a card of optkit/bench/card.py (rtx4090, t4)")
    card_gib: Optional[float] = setting(None, "emulate a card of this many GiB (instead of bench.card)")
    card_mode: str = setting("cap_and_ballast", "how a card is emulated (see optkit/bench/card.py)", choices=CARD_MODES)
    card_reserve_mib: int = setting(256, "cap_and_ballast / cap: card memory left outside the allocator cap", minimum=0)
    gpus: int = setting(1, "processes of a point, one GPU each (CPU: gloo); > 1 needs train.distributed", minimum=1)
    interleave: bool = setting(
        False, "windows in rounds, one process each: window r of every point before any window r+1 (A B C A B C)"
    )
    alloc_conf: str = setting(
        "expandable_segments:True",
        "PYTORCH_ALLOC_CONF (and PYTORCH_CUDA_ALLOC_CONF) of every point's process: one allocator config for all",
    )

    def __post_init__(self) -> None:
        check_fields(self, "bench")
        if self.card and self.card_gib:
            raise ValueError(f"set bench.card={self.card!r} or bench.card_gib={self.card_gib}, not both")


@dataclass
class OptkitConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    opt: OptConfig = field(default_factory=OptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


def register_configs() -> None:
    """Register the schema so conf/config.yaml's groups are type-checked against it."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="optkit_schema", node=OptkitConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="opt", name="schema", node=OptConfig)
    cs.store(group="train", name="schema", node=TrainConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="suite", name="schema", node=SuiteConfig)
