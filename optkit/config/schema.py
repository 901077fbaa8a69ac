"""Structured config schema for optkit (Hydra / OmegaConf).

Every field a YAML file under ``conf/`` may set is declared here, so a typo such as
``train.batchsize=4`` fails at composition time with the list of valid keys instead of being
silently ignored. YAML files hold values only; checks live in ``__post_init__`` / ``validate``.

The choice lists come from the modules that implement each choice (models, families, data, train), so a
new optimizer or checkpointing mode is valid here the moment it exists there. Hydra itself appears only
in config/ and the runner: ``register_configs`` puts these schemas in its ConfigStore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from optkit.data import LENGTH_DISTS
from optkit.data import SOURCES as DATA_SOURCES
from optkit.families import FAMILIES
from optkit.models import DTYPES
from optkit.train.checkpointing import MODES as CHECKPOINTING
from optkit.train.method import METHODS as TRAIN_METHODS
from optkit.train.optimizers import OPTIMIZERS

DEVICES = ("auto", "cuda", "cpu")  # bench.device
SUITE_KINDS = ("training", "kernels")  # what a suite's points measure; the runner picks the scenario by it


def _check_choice(field_name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field_name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


@dataclass
class ModelConfig:
    """Which model to build. Shapes come from ``hf_config``; weights are random unless ``path``."""

    name: str = "tiny_llama"  # zoo name, also the YAML file name in conf/model/
    family: str = "llama"  # llama | mistral | qwen2 | qwen3 | qwen3_moe | gemma2
    hf_config: Dict[str, Any] = field(default_factory=dict)  # kwargs of the family's HF config class
    path: Optional[str] = None  # local checkpoint directory (config.json + weights); overrides hf_config
    num_layers: Optional[int] = None  # cut the model to this many decoder layers (None: as published)
    dtype: str = "bfloat16"  # parameter / compute dtype
    attn_implementation: str = "sdpa"  # passed to HF: eager | sdpa | flex_attention
    experts_implementation: Optional[str] = None  # HF MoE switch: eager | grouped_mm | batched_mm

    def __post_init__(self) -> None:
        _check_choice("model.family", self.family, FAMILIES)
        _check_choice("model.dtype", self.dtype, DTYPES)


@dataclass
class KernelsConfig:
    """optkit's Triton kernels, each swapped into the model by the patcher."""

    rms_norm: bool = False  # RMSNorm modules -> optkit.kernels.rms_norm
    rope: bool = False  # rotary application -> optkit.kernels.apply_rotary
    swiglu: bool = False  # MLP activation silu(gate)*up -> optkit.kernels.swiglu
    geglu: bool = False  # MLP activation gelu(gate)*up (Gemma) -> optkit.kernels.geglu
    cross_entropy: bool = False  # loss on materialized logits -> optkit.kernels.cross_entropy
    fused_linear_cross_entropy: bool = False  # LM head + loss, logits never materialized


@dataclass
class OptConfig:
    """An optimization set. ``name`` labels result rows; every switch is independent."""

    name: str = "baseline"
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    fused_lora: bool = False  # fused LoRA autograd functions (MLP, QKV, O)
    packed_metadata_cache: bool = False  # packed-sequence boundary metadata built once per batch
    moe_sorted_routing: bool = False  # MoE: one sort + grouped GEMM instead of per-expert loop
    compile: bool = False  # torch.compile the model (peer, and composable with our kernels)
    compile_mode: Optional[str] = None  # torch.compile mode (None = default)
    liger: bool = False  # Liger-Kernel's own patching (peer; skipped row when not installed)


@dataclass
class TrainConfig:
    """The training step that is measured."""

    method: str = "lora"  # full | lora | qlora
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    qlora_quant_type: str = "nf4"
    qlora_double_quant: bool = True
    optimizer: str = "adamw"  # adamw | adamw_fused | adamw_8bit | paged_adamw_8bit
    lr: float = 1e-4
    weight_decay: float = 0.0
    checkpointing: str = "none"  # none | standard | offload | offload_double_buffer
    batch_size: int = 2
    warmup_steps: int = 3  # excluded from every statistic
    steps: int = 10  # timed steps
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("train.method", self.method, TRAIN_METHODS)
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("train.checkpointing", self.checkpointing, CHECKPOINTING)
        for name in ("batch_size", "steps", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class DataConfig:
    """Token batches: synthetic (seeded random) or learnable (deterministic, for convergence)."""

    source: str = "synthetic"  # synthetic | learnable
    seq_len: int = 512
    packing: bool = False  # padding-free packed rows of variable-length examples
    length_dist: str = "fixed"  # fixed | uniform | empirical (lengths of examples before packing)
    min_len: int = 16  # uniform distribution bounds
    max_len: int = 512
    lengths_csv: Optional[str] = None  # empirical histogram (default: the one shipped in optkit/data)
    pad_fraction: float = 0.0  # unpacked path: share of each row that is padding (not counted)

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, DATA_SOURCES)
        _check_choice("data.length_dist", self.length_dist, LENGTH_DISTS)
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.pad_fraction < 1.0:
            raise ValueError(f"data.pad_fraction must be in [0, 1), got {self.pad_fraction}")


@dataclass
class SuiteConfig:
    """A sweep: the cartesian product of ``axes`` (override key -> values), plus ``points``.

    Each expanded point is a list of Hydra overrides run in its own subprocess. ``opt: [ablation]``
    expands into baseline, full, each optimization alone on and each alone off (from the registry).
    """

    name: str = "none"
    description: str = ""
    kind: str = "training"  # training: points of training steps (bench/point.py) | kernels: per-op (bench/kernels/)
    axes: Dict[str, List[Any]] = field(default_factory=dict)
    fixed: Dict[str, Any] = field(default_factory=dict)  # overrides applied to every point
    points: List[Dict[str, Any]] = field(default_factory=list)  # extra explicit points
    baseline_opt: str = "baseline"  # the opt-set speedups are computed against
    requires_cuda: bool = False

    def __post_init__(self) -> None:
        _check_choice("suite.kind", self.kind, SUITE_KINDS)


@dataclass
class BenchConfig:
    """How points are run and measured."""

    device: str = "auto"  # auto | cuda | cpu
    results_dir: str = "results"  # rows go to <results_dir>/<gpu-slug>/<suite>/<run_id>/
    run_id: Optional[str] = None  # default: a timestamp
    resume: Optional[str] = None  # run id whose finished points are skipped
    timeout_s: int = 1800  # per point
    nvml_interval_ms: float = 10.0
    peak_tflops: Optional[float] = None  # override the GPU's dense bf16 peak (TFLOP/s)
    repeats: int = 1  # measurement windows per point
    isolate_repeats: bool = False  # each repeat in its own subprocess
    profile: bool = False  # torch.profiler trace of one measured step
    count_syncs: bool = False  # count device->host syncs per step (untimed extra step)
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("bench.device", self.device, DEVICES)
        if self.repeats < 1:
            raise ValueError(f"bench.repeats must be >= 1, got {self.repeats}")


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
