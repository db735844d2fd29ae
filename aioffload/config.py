"""One frozen configuration tree, built once (cli.py) and passed down explicitly.

`ModelConfig` describes the checkpoint's architecture (read from config.json);
`EngineConfig` holds every choice the user made. Neither is mutated after creation:
derived values are produced with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_MODEL = str(Path(__file__).parent / "assets" / "demo")  # the embedded demo model: the default --model
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
)
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
EXPERT_STREAM_MODES = ("auto", "routed", "full")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION_BACKENDS = ("auto", "torch", "xformers", "sdpa")
HYBRID_MODES = ("auto", "on", "off")
LOOKAHEAD_MODES = ("auto", "on", "off")
SPECULATIVE_METHODS = ("auto", "off", "ngram", "draft")
MAX_SPECULATIVE_TOKENS = 64


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says what to change."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    checkpoint_dtype: str
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (0 / () for dense models). `moe_layers` are the sparse layers, the
    # others use the dense MLP of `intermediate_size` (HF: mlp_only_layers, decoder_sparse_step).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0 = none
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities (always on for Mixtral)
    moe_layers: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def router_weights_fp32(self) -> bool:
        """Mixtral's router keeps the top-k weights in float32; Qwen's cast them to the model dtype."""
        return self.architecture == "MixtralForCausalLM"

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a Hugging Face config.json dict; raise ConfigError naming `source` on problems."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"{source}: unsupported architectures {archs!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):
            rope_theta = cfg["rope_parameters"].get("rope_theta")
            if rope_scaling is None and cfg["rope_parameters"].get("rope_type", "default") != "default":
                rope_scaling = cfg["rope_parameters"]
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3", "linear"):
                raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (default, linear, llama3)")
            if kind == "default":
                rope_scaling = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        moe = _moe_fields(arch, cfg, int(cfg["num_hidden_layers"]), source) if arch in MOE_ARCHITECTURES else {}
        if arch == "Qwen2MoeForCausalLM":
            qkv_bias = bool(cfg.get("qkv_bias", True))
        else:
            qkv_bias = arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            checkpoint_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **moe,
        )


def _moe_fields(arch: str, cfg: dict[str, Any], num_layers: int, source: str) -> dict[str, Any]:
    """The MoE fields of ModelConfig, read the way transformers reads them."""
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")  # transformers 5 saves either name
    top_k = cfg.get("num_experts_per_tok", 2)
    if arch == "MixtralForCausalLM":
        inter, shared, norm = cfg.get("intermediate_size"), 0, True
        sparse = tuple(range(num_layers))
    else:
        inter = cfg.get("moe_intermediate_size")
        shared = int(cfg.get("shared_expert_intermediate_size") or 0) if arch == "Qwen2MoeForCausalLM" else 0
        norm = bool(cfg.get("norm_topk_prob", False))
        step = cfg.get("decoder_sparse_step")
        step = 1 if step is None else int(step)
        dense = {int(i) for i in cfg.get("mlp_only_layers") or ()}
        if step < 1:
            raise ConfigError(f"{source}: decoder_sparse_step must be >= 1, got {step}")
        sparse = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    if not isinstance(experts, int) or experts < 1:
        raise ConfigError(f"{source}: {arch} needs num_experts (or num_local_experts) >= 1, got {experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ConfigError(f"{source}: num_experts_per_tok must be in [1, {experts}], got {top_k!r}")
    if not isinstance(inter, int) or inter < 1:
        key = "intermediate_size" if arch == "MixtralForCausalLM" else "moe_intermediate_size"
        raise ConfigError(f"{source}: {arch} needs {key} >= 1, got {inter!r}")
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
                shared_expert_intermediate_size=shared, norm_topk_prob=norm, moe_layers=sparse)  # fmt: skip


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None  # fixed pool size; None = size from free memory (GPU) or kv_cache_gb (CPU)
    cpu_kv_cache_gb: float = 0.25  # KV budget when running on the CPU


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # While no request is decoding, a step's first chunk of a fresh prompt may take this many tokens, so a
    # lone long prompt runs in one step (engine/prefill_share.py). Taken on a CUDA worker with every weight
    # resident where that step's activations fit in a tenth of the KV cache's memory
    # (worker.idle_token_budget); capped at max_model_len.
    max_prefill_tokens: int = 32768
    max_model_len: int | None = None  # None = min(model max positions, 4096)
    max_queue: int = 1024  # waiting requests beyond this are refused
    offload_hold_ms: float = 3.0  # how long an offloaded step may wait for more arrivals
    # Decode lookahead (engine/lookahead.py): launch the next decode step before this one's token ids
    # reach the host. auto = where the step runs as a CUDA graph (every weight resident) | on | off.
    lookahead: str = "auto"


@dataclass(frozen=True)
class OffloadConfig:
    trigger: float | str = 1.0  # 0..1, or "auto"
    cpu_offload_gb: float | None = None
    prefetch: int = 2  # staging ring slots
    gpu_memory_gb: float | None = None  # emulate a card of this size
    h2d_gbps: float | None = None  # None = measure at startup (GPU) / 25 assumed
    expert_cache_gb: float | None = None  # MoE: GPU cache of offloaded experts; None = spare KV memory
    expert_stream: str = "auto"  # MoE: routed (union of selected experts) | full (whole expert set) | auto
    embed_on_host: bool = False
    hybrid: str = "auto"  # auto | on | off: the host computes a share of each offloaded layer
    host_threads: int | None = None  # host-compute threads; None = physical cores - 1


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (DESIGN.md section 8, lever 2): proposals verified in the same step."""

    method: str = "auto"  # auto = ngram while offload is active, off otherwise | off | ngram | draft
    draft_model: str | None = None  # --speculative draft: a small checkpoint with the target's tokenizer
    num_tokens: int = 16  # --num-speculative-tokens: the most proposals a sequence carries in one step
    ngram_min: int = 2  # prompt lookup matches the last n tokens, n from ngram_max down to ngram_min
    ngram_max: int = 4

    def validate(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"--speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        if self.method == "draft" and not self.draft_model:
            raise ConfigError("--speculative draft needs --draft-model DIR")
        if self.draft_model and self.method != "draft":
            raise ConfigError(f"--draft-model is only used with --speculative draft (got --speculative {self.method})")
        if not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(
                f"--num-speculative-tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_tokens}"
            )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(
                f"need 1 <= --ngram-min <= --ngram-max, got --ngram-min {self.ngram_min} --ngram-max {self.ngram_max}"
            )


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism (DESIGN.md section 10): one process per rank, rank 0 runs the engine."""

    tensor_parallel_size: int = 1
    timeout_s: float = 600.0  # --distributed-timeout: a collective waiting longer than this fails the step
    rendezvous: str | None = None  # "host:port" of the ranks' store; set by the rank launcher, never a flag

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if not self.timeout_s > 0:
            raise ConfigError(f"--distributed-timeout must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"
    enforce_eager: bool = False
    seed: int = 0
    served_model_name: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> EngineConfig:
        """Check value ranges; raise ConfigError with a one-line message. Returns self."""
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        c, s, o = self.cache, self.scheduler, self.offload
        if c.block_size < 1 or c.block_size & (c.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, got {c.block_size}")
        if not 0.0 < c.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {c.gpu_memory_utilization}")
        if s.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be >= 1, got {s.max_num_seqs}")
        if s.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be >= 1, got {s.max_num_batched_tokens}")
        if s.max_prefill_tokens < 1:
            raise ConfigError(f"--max-prefill-tokens must be >= 1, got {s.max_prefill_tokens}")
        if s.max_model_len is not None and s.max_model_len < 1:
            raise ConfigError(f"--max-model-len must be >= 1, got {s.max_model_len}")
        if s.max_queue < 1:
            raise ConfigError(f"--max-queue must be >= 1, got {s.max_queue}")
        if s.lookahead not in LOOKAHEAD_MODES:
            raise ConfigError(f"--lookahead must be one of {', '.join(LOOKAHEAD_MODES)}, got {s.lookahead!r}")
        if isinstance(o.trigger, str):
            if o.trigger != "auto":
                raise ConfigError(f"--trigger must be a number in [0, 1] or 'auto', got {o.trigger!r}")
        elif not 0.0 <= o.trigger <= 1.0:
            raise ConfigError(f"--trigger must be in [0, 1], got {o.trigger}")
        if o.cpu_offload_gb is not None and o.cpu_offload_gb < 0:
            raise ConfigError(f"--cpu-offload-gb must be >= 0, got {o.cpu_offload_gb}")
        if o.cpu_offload_gb is not None and o.trigger != 1.0:
            raise ConfigError("--cpu-offload-gb and --trigger both say how much to offload: give only one")
        if o.prefetch < 1:
            raise ConfigError(f"--offload-prefetch must be >= 1, got {o.prefetch}")
        if o.gpu_memory_gb is not None and o.gpu_memory_gb <= 0:
            raise ConfigError(f"--gpu-memory-gb must be > 0, got {o.gpu_memory_gb}")
        if o.hybrid not in HYBRID_MODES:
            raise ConfigError(f"--hybrid must be one of {', '.join(HYBRID_MODES)}, got {o.hybrid!r}")
        if o.host_threads is not None and o.host_threads < 1:
            raise ConfigError(f"--host-threads must be >= 1, got {o.host_threads}")
        if o.h2d_gbps is not None and o.h2d_gbps <= 0:
            raise ConfigError(f"--h2d-gbps must be > 0, got {o.h2d_gbps}")
        if o.expert_cache_gb is not None and o.expert_cache_gb < 0:
            raise ConfigError(f"--expert-cache-gb must be >= 0, got {o.expert_cache_gb}")
        if o.expert_stream not in EXPERT_STREAM_MODES:
            modes = ", ".join(EXPERT_STREAM_MODES)
            raise ConfigError(f"--expert-stream must be one of {modes}, got {o.expert_stream!r}")
        if isinstance(o.trigger, float | int) and not isinstance(o.trigger, bool):
            if o.trigger < 1.0 and o.trigger > c.gpu_memory_utilization:
                raise ConfigError(
                    f"--trigger {o.trigger} is above --gpu-memory-utilization {c.gpu_memory_utilization}: "
                    "weights would leave no room for the KV cache; lower the trigger"
                )
        self.speculative.validate()
        self.parallel.validate()
        return self


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    shutdown_timeout_s: float = 10.0
    allowed_origins: tuple[str, ...] = ()  # CORS; empty = off
    tool_call_parser: str | None = None  # None: chosen by the chat template
