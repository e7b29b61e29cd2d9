"""``medmm plan``: will a training config fit, and with which ZeRO stage?

From a :class:`~medmm.config.TrainConfig` alone (the model is built on PyTorch's ``meta`` device, so nothing is
allocated and no weights are read), for ``N`` GPUs per node and ``M`` nodes:

- parameters per part (LLM, each encoder and projector), total and trainable;
- model-state memory per GPU and per node's CPU for ZeRO-2, ZeRO-3 and ZeRO-3 with optimizer and parameters
  offloaded to the CPU, by DeepSpeed's own formulas (``estimate_zero2_model_states_mem_needs`` in
  ``deepspeed.runtime.zero.stage_1_and_2`` and ``estimate_zero3_model_states_mem_needs`` in ``stage3``, checked
  against those functions in ``tests/test_plan.py``). Like DeepSpeed's estimators they count every parameter
  (16-bit weights, and fp32 master weights, gradients and Adam moments), so frozen parts make them an upper bound;
- LLM activation memory per micro-batch, with and without gradient checkpointing;
- tokens per optimizer step (padded to ``data.max_length``);
- the first stage whose model states plus activations fit ``--gpu-memory``.

Activation model (one decoder layer of a Llama-shaped LLM, ``b`` sequences of ``s`` tokens, ``e`` bytes per
element: 2 for bf16/fp16, 4 for fp32; the tensors autograd keeps for backward)::

    attention   e*b*s*(2h [norm in, out] + h + 2*kv [q, k, v] + h [attn out])   (+ 2*e*a*b*s^2 scores, softmax
                                                                               when attention is eager)
    MLP         e*b*s*(2h [norm in, out] + 4*I [gate, up, act(gate), gate*up])

without checkpointing every layer keeps these; with it each layer keeps its input (``e*b*s*h``) and one layer is
recomputed at a time. Logits add ``b*s*V*(e + 4)`` (the fp32 copy for the loss). Encoder activations are not
counted (the encoders are small next to the LLM).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..config import TrainConfig
from ..errors import ConfigError

GiB = 2**30


# ----------------------------------------------------------------------------- DeepSpeed's formulas
def zero2_model_states(total_params: int, gpus_per_node: int = 1, nodes: int = 1, cpu_offload: bool = False,
                       buffer_factor: float = 1.5) -> tuple[int, int]:
    """Bytes (per CPU node, per GPU) of ZeRO-2 model states: DeepSpeed's ``estimate_zero2_model_states_mem_needs``."""
    gpus = nodes * gpus_per_node
    if cpu_offload:
        gpu = 2 * total_params
        cpu = total_params * max(4 * gpus, 16) * buffer_factor
    else:  # 2 = 16-bit params; 18 = 16-bit + fp32 grads, fp32 params, Adam's two fp32 moments, over the GPUs
        gpu = 2 * total_params + int(18 * total_params / gpus)
        cpu = total_params * 4 * gpus_per_node * buffer_factor
    return int(cpu), int(gpu)


def zero3_model_states(total_params: int, largest_layer_params: int, gpus_per_node: int = 1, nodes: int = 1,
                       cpu_offload: bool = False, cpu_offload_params: bool = False, zero_init: bool = True,
                       buffer_factor: float = 1.5) -> tuple[int, int]:
    """Bytes (per CPU node, per GPU) of ZeRO-3 model states: DeepSpeed's ``estimate_zero3_model_states_mem_needs``."""
    gpus = nodes * gpus_per_node
    per_node = 1 / nodes
    largest = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu = largest
            cpu = total_params * (18 * per_node if zero_init else max(4 * gpus_per_node, 18 * per_node)) * buffer_factor
        else:
            gpu = largest + int(2 * total_params / gpus)
            cpu = total_params * (16 * per_node if zero_init else max(4 * gpus_per_node, 16 * per_node)) * buffer_factor
    else:
        gpu = largest + int(18 * total_params / gpus)
        cpu = (largest_layer_params if zero_init else total_params) * 4 * gpus_per_node * buffer_factor
    return int(cpu), int(gpu)


# ----------------------------------------------------------------------------- activations
@dataclass
class LlmShape:
    """What the activation estimate needs of the LLM."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_hf_config(cls, c) -> LlmShape:
        c = c.get_text_config() if hasattr(c, "get_text_config") else c
        try:
            hidden, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
        except AttributeError as e:
            raise ConfigError(f"model.llm: the HF config has no {e.name}; plan needs a decoder-only transformer") from e
        return cls(hidden=hidden, intermediate=getattr(c, "intermediate_size", None) or 4 * hidden, layers=layers,
                   heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads, vocab=c.vocab_size)


def activation_bytes(shape: LlmShape, micro_batch: int, seq_len: int, bytes_per_elem: int = 2,
                     eager_attention: bool = False, checkpointing: bool = False) -> int:
    """LLM activation bytes kept for backward in one micro-batch (model in the module docstring)."""
    b, s, e, h = micro_batch, seq_len, bytes_per_elem, shape.hidden
    kv = h // shape.heads * shape.kv_heads
    layer = e * b * s * (2 * h + h + 2 * kv + h + 2 * h + 4 * shape.intermediate)
    if eager_attention:
        layer += 2 * e * shape.heads * b * s * s
    logits = b * s * shape.vocab * (e + 4)
    embed = e * b * s * h
    if checkpointing:
        return int(embed + shape.layers * e * b * s * h + layer + logits)
    return int(embed + shape.layers * layer + logits)


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """The figures ``medmm plan`` prints (every memory figure in bytes)."""

    gpus_per_node: int
    nodes: int
    gpu_memory: int
    params: dict[str, dict[str, int]]
    total_params: int
    trainable_params: int
    largest_layer_params: int
    model_states: dict[str, dict[str, int]]
    activations: dict[str, int]
    tokens_per_step: int
    gradient_checkpointing: bool
    fits: dict[str, bool] = field(default_factory=dict)
    first_fit: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        g = lambda n: f"{n / GiB:8.2f}"  # noqa: E731
        lines = [f"{'part':<28}{'params':>16}{'trainable':>16}"]
        for name, p in self.params.items():
            lines.append(f"{name:<28}{p['total']:>16,}{p['trainable']:>16,}")
        lines.append(f"{'total':<28}{self.total_params:>16,}{self.trainable_params:>16,}")
        lines.append(f"largest layer: {self.largest_layer_params:,} params")
        lines.append("")
        lines.append(f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s), {self.gpu_memory / GiB:.1f} GiB each")
        lines.append(f"{'stage':<16}{'GPU GiB':>9}{'CPU GiB/node':>14}{'+activations':>14}{'fits':>6}")
        act = self.activations["checkpointing" if self.gradient_checkpointing else "no_checkpointing"]
        for stage, m in self.model_states.items():
            lines.append(f"{stage:<16}{g(m['gpu']):>9}{g(m['cpu']):>14}{g(m['gpu'] + act):>14}"
                         f"{'yes' if self.fits[stage] else 'no':>6}")
        lines.append("")
        lines.append(f"activations per micro-batch: {g(self.activations['no_checkpointing']).strip()} GiB without "
                     f"gradient checkpointing, {g(self.activations['checkpointing']).strip()} GiB with "
                     f"(model.gradient_checkpointing={self.gradient_checkpointing})")
        lines.append(f"tokens per step: {self.tokens_per_step:,}")
        lines.append(f"first stage that fits: {self.first_fit or 'none'}")
        return "\n".join(lines)


def count_parameters(cfg: TrainConfig):
    """Build the model of ``cfg`` on the meta device; returns (params per part, largest layer, LLM shape)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..model.multimodal import MedMMForCausalLM, add_modality_tokens

    m = cfg.model
    if not m.llm:
        raise ConfigError("model.llm: plan needs the path of a local Hugging Face causal LM folder")
    try:
        hf = AutoConfig.from_pretrained(m.llm)
        tokenizer = AutoTokenizer.from_pretrained(m.tokenizer or m.llm)
    except OSError as e:
        raise ConfigError(f"model.llm: cannot read '{m.llm}' ({e})") from e
    add_modality_tokens(tokenizer, list(m.modalities))
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(hf)
        if llm.get_input_embeddings().num_embeddings < len(tokenizer):
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = MedMMForCausalLM._assemble(m, llm, tokenizer, load_encoder_weights=False)

    def part(module) -> dict[str, int]:
        ps = {id(p): p for p in module.parameters()}.values()  # tied weights once
        return {"total": sum(p.numel() for p in ps), "trainable": sum(p.numel() for p in ps if p.requires_grad)}

    params = {"llm": part(model.llm)}
    for name, enc in model.encoders.items():
        params[f"encoders.{name}"] = part(enc)
    for name, proj in model.projectors.items():
        params[f"projectors.{name}"] = part(proj)
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    shape = LlmShape.from_hf_config(hf)
    shape.vocab = max(shape.vocab, len(tokenizer))
    return params, largest, shape


def make_plan(cfg: TrainConfig, gpus_per_node: int, nodes: int = 1, gpu_memory_gb: float | None = None,
              counts=None) -> Plan:
    """The plan of ``cfg`` on ``nodes`` x ``gpus_per_node`` GPUs of ``gpu_memory_gb`` GB (default: this machine's
    GPU, else 80). ``counts`` = a precomputed :func:`count_parameters` result (tests)."""
    if gpus_per_node < 1 or nodes < 1:
        raise ConfigError(f"plan: --gpus and --nodes must be >= 1, got {gpus_per_node} and {nodes}")
    if gpu_memory_gb is None:
        import torch

        gpu_memory_gb = (torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available()
                         else 80.0)
    params, largest, shape = counts or count_parameters(cfg)
    total = sum(p["total"] for p in params.values())
    trainable = sum(p["trainable"] for p in params.values())
    states = {}
    cpu, gpu = zero2_model_states(total, gpus_per_node, nodes, cpu_offload=False)
    states["zero2"] = {"cpu": cpu, "gpu": gpu}
    cpu, gpu = zero3_model_states(total, largest, gpus_per_node, nodes, cpu_offload=False, cpu_offload_params=False)
    states["zero3"] = {"cpu": cpu, "gpu": gpu}
    cpu, gpu = zero3_model_states(total, largest, gpus_per_node, nodes, cpu_offload=True, cpu_offload_params=True)
    states["zero3_offload"] = {"cpu": cpu, "gpu": gpu}

    t = cfg.trainer
    e = 4 if t.precision == "fp32" else 2
    eager = cfg.model.attn_implementation == "eager"
    s = cfg.data.max_length
    acts = {"no_checkpointing": activation_bytes(shape, t.micro_batch_size, s, e, eager, checkpointing=False),
            "checkpointing": activation_bytes(shape, t.micro_batch_size, s, e, eager, checkpointing=True)}
    act = acts["checkpointing" if cfg.model.gradient_checkpointing else "no_checkpointing"]
    limit = int(gpu_memory_gb * 1e9)
    fits = {k: v["gpu"] + act <= limit for k, v in states.items()}
    first = next((k for k, ok in fits.items() if ok), None)
    return Plan(gpus_per_node=gpus_per_node, nodes=nodes, gpu_memory=limit, params=params, total_params=total,
                trainable_params=trainable, largest_layer_params=largest, model_states=states, activations=acts,
                tokens_per_step=t.micro_batch_size * t.grad_accum * gpus_per_node * nodes * s,
                gradient_checkpointing=cfg.model.gradient_checkpointing, fits=fits, first_fit=first)


def format_plan(plan: Plan, as_json: bool = False) -> str:
    return json.dumps(plan.to_dict(), indent=2) if as_json else plan.table()


__all__ = ["Plan", "LlmShape", "activation_bytes", "count_parameters", "format_plan", "make_plan",
           "zero2_model_states", "zero3_model_states"]
