"""The typed config tree: YAML holds values, dataclasses hold the schema, dotted overrides on top.

``load_config(TrainConfig, "configs/demo.yaml", ["trainer.max_steps=20"])`` reads the YAML with
``yaml.safe_load``, applies ``key=value`` overrides (values parsed as YAML scalars), and builds the
dataclasses. An unknown key or a value of the wrong type raises :class:`ConfigError` naming the
dotted key and the file (or ``<override>``). YAML names registry entries, never import paths.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError

Trainable = Literal["frozen", "lora", "full"]


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (peft ``LoraConfig``)."""

    r: int = 8
    """Rank of the update matrices."""
    alpha: int = 16
    """Scaling numerator (``lora_alpha``)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Module name suffixes to adapt; None means every ``nn.Linear`` except the output head."""
    modules_to_save: list[str] | None = None
    """LLM modules trained in full beside the adapter (peft ``modules_to_save``), e.g. ``[lm_head]``."""

    def __post_init__(self):
        if self.r <= 0:
            raise ConfigError(f"lora.r must be positive, got {self.r}")


@dataclass
class EncoderConfig:
    """A modality encoder from the ``encoders`` registry."""

    name: str = "vit2d_tiny"
    """Registry name (``encoders.list_encoders()``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Architecture overrides passed to the builder (e.g. ``img_size``, ``depth``)."""
    checkpoint: str | None = None
    """Local weights file (safetensors or torch state dict) loaded into the encoder."""
    trainable: Trainable = "frozen"
    """frozen | lora | full."""


@dataclass
class ProjectorConfig:
    """Maps encoder features (B, N, D_enc) to LLM tokens (B, K, D_llm)."""

    type: str = "mlp2x_gelu"
    """Registry name: linear | mlp2x_gelu | resampler."""
    num_queries: int = 32
    """resampler only: learned queries, i.e. the cap on LLM tokens per input."""
    depth: int = 1
    """resampler only: cross-attention layers."""
    heads: int = 4
    """resampler only: attention heads."""
    trainable: Trainable = "full"
    """frozen | lora | full."""


@dataclass
class PreprocessConfig:
    """Input preprocessing saved beside the weights, so a checkpoint rebuilds from its folder alone."""

    image_size: int = 64
    """image: side of the square input after resizing."""
    channels: int = 3
    """image: channels fed to the encoder (grey images are repeated)."""
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """image: per-channel mean after scaling to [0, 1]."""
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    """image: per-channel std."""
    window: str | None = None
    """DICOM: window preset (lung, mediastinum, bone, brain, abdomen) or None for the file's VOI/min-max."""
    volume_size: list[int] = field(default_factory=lambda: [16, 64, 64])
    """volume: (D, H, W) after resampling."""
    fingerprint_bits: int = 2048
    """mol: Morgan fingerprint length."""
    fingerprint_radius: int = 2
    """mol: Morgan radius."""
    mol_canonical_tautomer: bool = True
    """mol (mol_graph loader): replace each molecule by RDKit's canonical tautomer (stereo kept)."""
    mol_remove_stereo: bool = False
    """mol (mol_graph loader): drop stereo tags before featurising."""
    mol_max_heavy_atoms: int = 200
    """mol (mol_graph loader): larger molecules are rejected with a SmilesError."""
    kmer: int = 1
    """dna: k-mer size of the tokeniser (1 = nucleotides)."""
    max_length: int = 512
    """dna: longest sequence kept (longer ones are centre-cropped)."""
    slide_mpp: float = 0.5
    """slide (slide_tiles loader): microns per pixel of the tiles."""
    slide_tile: int = 224
    """slide (slide_tiles loader): tile side in pixels at ``slide_mpp`` (resized to ``image_size`` for the encoder)."""
    slide_min_tissue: float = 0.5
    """slide (slide_tiles loader): least tissue fraction of a kept tile (Otsu mask)."""
    slide_max_tiles: int = 4096
    """slide: tiles per slide at most; larger bags keep an evenly spaced subset (deterministic)."""
    slide_feature_dim: int = 1024
    """slide (slide_features loader): width of the precomputed tile features (UNI: 1024); checked on load."""

    def __post_init__(self):
        if len(self.volume_size) != 3:
            raise ConfigError(f"preprocess.volume_size needs 3 numbers (D, H, W), got {self.volume_size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError("preprocess.mean/std need one value per channel")


@dataclass
class ModalityConfig:
    """One modality: how its input is loaded, encoded and projected. Its placeholder is ``<name>``."""

    loader: str = "image"
    """Input loader registry name: image | volume | smiles_fingerprint | mol_graph | dna_tokens."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The encoder."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """The projector into the LLM's embedding space."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Preprocessing of raw inputs."""
    max_tokens: int = 256
    """Cap on LLM tokens per input of this modality (a 3D study or slide must go through the resampler)."""


@dataclass
class ModelConfig:
    """The multimodal causal LM."""

    llm: str = ""
    """Path of a local Hugging Face causal LM folder (``AutoModelForCausalLM.from_pretrained``)."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to ``llm``."""
    llm_trainable: Trainable = "lora"
    """frozen | lora | full."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings for every part set to ``lora``."""
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    """Modality name (image, volume, slide, mol, dna, ...) -> its config."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in backward to save memory."""
    attn_implementation: str | None = None
    """Passed to ``from_pretrained`` (sdpa, eager, flash_attention_2); None lets HF choose."""

    def __post_init__(self):
        for name in self.modalities:
            if not name.isidentifier():
                raise ConfigError(f"model.modalities.{name}: modality names must be identifiers")


@dataclass
class DatasetConfig:
    """One dataset of a training mixture."""

    path: str = ""
    """Conversation JSONL file (``format: text``: a corpus file or folder)."""
    weight: float = 1.0
    """Relative sampling weight in the mixture."""
    name: str | None = None
    """Display name (defaults to the file stem)."""
    format: Literal["conversation", "text"] = "conversation"
    """conversation = LLaVA-style records; text = pretraining documents: JSONL with a ``text`` field or ``.txt``
    (one document per non-empty line). Stage pretrain reads both: a conversation record there becomes a captioning
    document (its modality inputs, then its last answer, e.g. an image and its report)."""
    text_field: str = "text"
    """format text: the JSONL field holding the document."""

    def __post_init__(self):
        if self.weight <= 0:
            raise ConfigError(f"data.datasets[{self.path}].weight must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    """Training data."""

    datasets: list[DatasetConfig] = field(default_factory=list)
    """Mixture components."""
    epoch_size: int | None = None
    """Samples per mixture epoch; None = sum of dataset sizes."""
    max_length: int = 512
    """Sequences longer than this are truncated (modality tokens are never cut)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (load failures in workers still reach ``errors.jsonl``)."""
    pin_memory: bool = True
    """Pin host batches for faster copies to the GPU (only on CUDA)."""
    system_prompt: str | None = None
    """Optional system message prepended to every conversation."""
    packing: Literal["none", "concat", "neat"] = "none"
    """none = each batch padded to its longest sample; concat (stage pretrain) = documents joined with EOS and cut
    into ``max_length`` blocks, attention across documents; neat (pretrain, sft) = ``max_length`` blocks whose
    documents keep their own positions and attend only to themselves (``medmm.data.packing``)."""


@dataclass
class TrainerConfig:
    """The DeepSpeed training loop."""

    output_dir: str = "runs/train"
    """Run folder: checkpoints/, tb/, metrics.jsonl, checkpoint/ (final model)."""
    deepspeed: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON config (ZeRO stage, offload); batch sizes and clipping are filled in from here."""
    max_steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 2
    """Samples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps, then cosine decay to 10% of the peak."""
    grad_clip: float = 1.0
    """Gradient norm clipping."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    save_every: int = 50
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    log_every: int = 1
    """Log loss every N steps (progress bar, TensorBoard, metrics.jsonl)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 on a GPU that supports it, fp32 on CPU."""
    stage: str = "sft"
    """A registered training stage (``medmm.training.stages.list_stages()``): sft = next-token loss on answers;
    align = image-report contrastive pretraining (section ``align``); head = an encoder + classification head
    without the LLM (section ``head``)."""
    init_from: str | None = None
    """A medmm model folder whose encoder and projector weights start this run (e.g. the align stage's)."""
    init_llm: Literal["merged", "adapter", "none"] = "merged"
    """With ``init_from``, how its language model starts this run: merged = its weights with its LoRA adapter folded
    in (a ``model.llm_trainable: lora`` run then trains a new adapter); adapter = its base weights and its adapter,
    trained on (same LoRA settings); none = only encoders and projectors are carried."""
    eval_fraction: float = 0.0
    """Stage pretrain: share of the documents held out (by a hash of their text) and scored every ``eval_every``
    steps as ``eval_loss`` and ``eval_ppl`` (held-out perplexity) in ``metrics.jsonl``."""
    epochs: int | None = None
    """When set, train this many passes over the stage's training data; replaces ``max_steps``."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """cosine = linear warm-up then cosine decay to 10% of the peak; constant = warm-up then the peak."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eval_every: int = 0
    """Score the stage's validation data every N optimizer steps; 0 = after every epoch when ``epochs`` is set,
    else never. Stages without validation data skip it."""
    patience: int = 0
    """Stop after this many evaluations in a row without a better validation score (0 = never stop early)."""
    restore_best: bool = False
    """At the end, go back to the weights of the best evaluation (ZeRO 0-2); the final folder holds those."""
    cpu_threads: int | None = None
    """torch CPU threads per rank (None = torch's default)."""

    def __post_init__(self):
        for k in ("max_steps", "micro_batch_size", "grad_accum", "save_every", "keep_last", "log_every"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"trainer.{k} must be positive, got {getattr(self, k)}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"trainer.epochs must be positive, got {self.epochs}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"trainer.adam_betas needs two numbers in [0, 1), got {self.adam_betas}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"trainer.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_every < 0 or self.patience < 0:
            raise ConfigError("trainer.eval_every and trainer.patience must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError(f"trainer.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class AlignConfig:
    """The ``align`` stage: one modality's encoder + projector aligned with report text (CLIP-style)."""

    modality: str = "image"
    """The modality whose encoder + projector are aligned with the report text."""


@dataclass
class HeadDataConfig:
    """The ``head`` stage's labelled data and how it is split."""

    path: str = ""
    """The labelled file: CSV/TSV (``.gz`` allowed) for molecules and DNA, a slide JSONL for slides."""
    input_col: str = "smiles"
    """Column holding the input (SMILES, DNA sequence); table featurisers only."""
    label_col: str = "label"
    """Column (or JSONL field) holding the label; blank cells are reported and skipped."""
    delimiter: str | None = None
    """Field separator; None = tab for .tsv/.txt files, comma otherwise."""
    split: Literal["scaffold", "stratified", "random", "none"] = "scaffold"
    """scaffold (Bemis-Murcko, molecules only) | stratified | random into train/validation/test by ``fractions``;
    none = all of ``path`` trains, and ``eval_path`` is both the validation and the test part."""
    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train / validation / test shares."""
    eval_path: str | None = None
    """split none: a held-out labelled file scored after every epoch and at the end."""
    seed: int = 0
    """Seed of the split."""
    workers: int = 2
    """Featurisation worker processes (0 = in this process)."""
    limit: int | None = None
    """Read at most this many rows (quick runs)."""

    def __post_init__(self):
        if self.split != "none" and (len(self.fractions) != 3 or abs(sum(self.fractions) - 1) > 1e-6
                                     or any(f < 0 for f in self.fractions)):
            raise ConfigError(f"head.data.fractions must be three shares summing to 1, got {self.fractions}")


@dataclass
class HeadStageConfig:
    """The ``head`` stage: a registered featuriser, encoder and head trained on labels, without the LLM."""

    featuriser: str = "molecules"
    """Featuriser registry name (``medmm.data.featurisers.list_featurisers()``): molecules | dna | slides."""
    data: HeadDataConfig = field(default_factory=HeadDataConfig)
    loader: str = "mol_graph"
    """Input loader registry name matching the encoder (mol_graph, smiles_fingerprint, dna_tokens, slide_features)."""
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="mol_gin", trainable="full"))
    """The encoder (or slide aggregator); ``trainable: frozen`` trains the head alone (a probe)."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Input preprocessing (saved in the checkpoint)."""
    type: str = "mlp"
    """Head registry name (``medmm.model.heads.list_heads()``): mlp (masked mean + max -> MLP) | linear."""
    hidden: int = 128
    """mlp: hidden width."""
    dropout: float = 0.1
    """Dropout before the output layer."""
    objective: Literal["binary", "multiclass"] = "binary"
    """binary = one logit, BCE, 0/1 labels (or the two ``classes``); multiclass = one logit per class, cross-entropy."""
    classes: list[str] = field(default_factory=list)
    """Class names in output order; empty = 0/1 for binary, the sorted training labels for multiclass."""
    class_weights: Literal["none", "balanced"] = "none"
    """balanced = inverse class frequency in the loss."""
    calibration: Literal["temperature", "none"] = "temperature"
    """binary: temperature scaling fitted on the validation part after training."""
    train_max_tokens: int | None = None
    """Training only: a random subset of at most this many encoder inputs (tiles of a slide) per item and epoch."""
    bootstrap: int = 0
    """Bootstrap resamples for the final metrics' 95% intervals (multiclass; 0 = none)."""

    def __post_init__(self):
        if self.encoder.trainable == "lora":
            raise ConfigError("head.encoder.trainable: head stages train the encoder 'full' or keep it 'frozen'")
        if self.data.split == "scaffold" and self.featuriser != "molecules":
            raise ConfigError("head.data.split=scaffold needs molecules (head.featuriser: molecules)")
        if self.data.split == "none" and not self.data.eval_path and self.data.path:
            raise ConfigError("head.data.split=none needs head.data.eval_path (the held-out file)")
        if self.objective == "binary" and self.classes and len(self.classes) != 2:
            raise ConfigError(f"head.objective=binary takes two classes, got {self.classes}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"head.classes has duplicates: {self.classes}")
        if self.objective == "multiclass" and self.calibration != "none":
            raise ConfigError("head.calibration=temperature is for objective binary; set head.calibration: none")


@dataclass
class TrainConfig:
    """Everything ``train.py`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The multimodal causal LM (stages sft, align)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Conversation data (stages sft, align)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The loop; ``trainer.stage`` names the stage, which reads its own section below."""
    align: AlignConfig = field(default_factory=AlignConfig)
    """Stage ``align``."""
    head: HeadStageConfig = field(default_factory=HeadStageConfig)
    """Stage ``head``."""


@dataclass
class DecodingConfig:
    """Decoding options passed to Hugging Face ``generate``."""

    strategy: Literal["greedy", "beam", "sample", "speculative", "prompt_lookup", "contrastive",
                      "contrastive_search"] = "greedy"
    """greedy | beam | sample (HF generate); speculative | prompt_lookup | contrastive | contrastive_search (medmm)."""
    max_new_tokens: int = 64
    """Tokens generated at most."""
    num_beams: int = 4
    """beam only."""
    length_penalty: float = 1.0
    """beam only."""
    temperature: float = 1.0
    """sample only; 0 means greedy."""
    top_k: int = 50
    """sample only."""
    top_p: float = 1.0
    """sample only."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeats."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating n-grams of this size (0 = off)."""
    seed: int = 0
    """Sampling seed."""
    draft: str | None = None
    """speculative: local folder of a text-only draft causal LM sharing the tokenizer."""
    num_draft_tokens: int = 4
    """speculative / prompt_lookup: tokens proposed per verification step."""
    amateur: str | None = None
    """contrastive: local folder of the amateur (small) causal LM sharing the tokenizer."""
    cd_alpha: float = 0.1
    """contrastive: plausibility cut-off (keep tokens with p >= alpha * max p)."""
    cd_beta: float = 0.5
    """contrastive: weight of the amateur ((1+beta) log p_expert - beta log p_amateur)."""
    penalty_alpha: float = 0.6
    """contrastive_search: degeneration penalty."""
    search_top_k: int = 4
    """contrastive_search: candidates looked ahead per step."""

    def __post_init__(self):
        if self.strategy == "speculative" and not self.draft:
            raise ConfigError("decoding.strategy=speculative needs decoding.draft (a local model folder)")
        if self.strategy == "contrastive" and not self.amateur:
            raise ConfigError("decoding.strategy=contrastive needs decoding.amateur (a local model folder)")


@dataclass
class InferConfig:
    """Everything ``infer.py`` needs besides its inputs."""

    checkpoint: str = ""
    """A medmm model folder (``save_pretrained`` output)."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    batch_size: int = 8
    """Requests per batch for ``--manifest`` runs."""
    device: str = "auto"
    """auto | cpu | cuda."""


# --------------------------------------------------------------------------------------------
# Loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, key: str, source: str):
    """Check/convert ``value`` against the annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: {key}: {value!r} does not match {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, key, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {type(value).__name__}")
        (a,) = args or (Any,)
        return [_convert(a, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
        _, va = args or (str, Any)
        return {str(k): _convert(va, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{source}: unknown key '{where}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed value). Values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"<override>: '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"<override>: '{text}' has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a raw mapping; a numeric part indexes a list (``data.datasets.0.path=x``).

    Unknown keys are caught later, by the schema."""
    for ov in overrides:
        path, value = parse_override(ov)
        node: Any = data
        for i, p in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"<override>: '{ov}': '{p}' is not an index of a list of {len(node)}")
                if last:
                    node[int(p)] = value
                else:
                    node = node[int(p)]
            elif isinstance(node, dict):
                if last:
                    node[p] = value
                else:
                    node = node.setdefault(p, {})
            else:
                raise ConfigError(f"<override>: '{ov}': '{path[i - 1]}' is not a mapping")
    return data


def config_from_dict(cls, data: dict, source: str = "<dict>"):
    """Build a config dataclass from a raw mapping."""
    return _build(cls, data or {}, "", source)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load ``cls`` from a YAML file (``safe_load``) plus dotted overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: config file not found") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    if overrides:
        data = apply_overrides(data, list(overrides))
        source = f"{source} (+ overrides)"
    return config_from_dict(cls, data, source)


def to_dict(cfg) -> dict:
    """A plain-data copy of a config dataclass (for JSON/YAML)."""
    return dataclasses.asdict(cfg)
