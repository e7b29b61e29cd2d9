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
from .utils import locate

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
    """A registered encoder (``medmm list encoders``)."""
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
    """A registered projector (``medmm list projectors``)."""
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
    """DICOM: window preset (lung, mediastinum, bone, brain, abdomen) or None for ``window_fallback``."""
    window_fallback: Literal["file", "minmax"] = "file"
    """DICOM without a preset: file = the file's own window (a single image: its VOI transform), else min-max;
    minmax = min-max of the values. Copied from the prepared data by training (``medmm.modalities``)."""
    spacing: list[float] | None = None
    """volume: resample raw series to this spacing in mm (slice, row, column) before resizing; None keeps the grid.
    Copied from ``prepare dicom --spacing`` by training."""
    prepared_volume_size: list[int] | None = None
    """volume: (D, H, W) ``prepare dicom`` resized to (its ``--size-3d``); raw series are resized to it first, then
    to ``volume_size`` as the shard arrays were. None = straight to ``volume_size``. Copied by training."""
    prepared_image_size: int | None = None
    """image (DICOM): side ``prepare dicom`` resized single images to; raw DICOM images are resized to it first, then
    to ``image_size`` as the shard arrays were. None = straight to ``image_size``. Copied by training."""
    volume_size: list[int] = field(default_factory=lambda: [16, 64, 64])
    """volume: (D, H, W) the encoder takes."""
    fingerprint_bits: int = 2048
    """mol: Morgan fingerprint length."""
    fingerprint_radius: int = 2
    """mol: Morgan radius."""
    mol_largest_fragment: bool = True
    """mol (head featuriser): keep the largest organic fragment after RDKit's cleanup (off: every fragment, as
    the MoleculeNet reference featurises the SMILES as written)."""
    mol_neutralise: bool = True
    """mol (head featuriser): neutralise charges where a neutral form exists (off: charges as written)."""
    mol_canonical_tautomer: bool = True
    """mol (mol_graph loader): replace each molecule by RDKit's canonical tautomer (stereo kept); the costliest
    step of standardisation (off for protocols that featurise the SMILES as written, e.g. MoleculeNet)."""
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
    slide_mask_mpp: float = 8.0
    """slide (slide_tiles loader): microns per pixel of the tissue mask."""
    slide_scan_mpp: float | None = None
    """slide (slide_tiles loader): scan MPP assumed for slides whose metadata has none (``prepare wsi --slide-mpp``)."""
    slide_max_tiles: int = 4096
    """slide: tiles per slide at most; larger bags keep an evenly spaced subset (deterministic)."""
    slide_feature_dim: int = 1024
    """slide (slide_features loader): width of the precomputed tile features (UNI: 1024); checked on load."""

    def __post_init__(self):
        if len(self.volume_size) != 3:
            raise ConfigError(f"preprocess.volume_size needs 3 numbers (D, H, W), got {self.volume_size}")
        if self.prepared_volume_size is not None and len(self.prepared_volume_size) != 3:
            raise ConfigError("preprocess.prepared_volume_size needs 3 numbers (D, H, W), "
                              f"got {self.prepared_volume_size}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ConfigError(f"preprocess.spacing needs 3 positive numbers (mm), got {self.spacing}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError("preprocess.mean/std need one value per channel")


@dataclass
class ModalityConfig:
    """One modality: how its input is loaded, encoded and projected. Its placeholder is ``<name>``."""

    loader: str = "image"
    """A registered input loader (``medmm list loaders``)."""
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
    """Conversation JSONL file (``format: text``: a corpus file or folder; ``format: wds``: shards, as ``shards``)."""
    weight: float = 1.0
    """Relative sampling weight in the mixture."""
    name: str | None = None
    """Display name (defaults to the file stem)."""
    format: Literal["conversation", "jsonl", "text", "wds"] = "conversation"
    """conversation (alias jsonl) = LLaVA-style records; text = pretraining documents: JSONL with a ``text`` field or
    ``.txt`` (one document per non-empty line). Stage pretrain reads both: a conversation record there becomes a
    captioning document (its modality inputs, then its last answer, e.g. an image and its report). wds = webdataset
    shards streamed, never loaded whole (:mod:`medmm.data.streaming`): each sample carries its record in a ``json``
    (or ``conversations.json``) member and its modality input as an ``npz``/``npy``/``jpg``/``png`` member."""
    text_field: str = "text"
    """format text (and wds text samples): the JSON field holding the document."""
    shards: str | list[str] | None = None
    """format wds: shard URLs (local paths, brace patterns ``shard-{000000..000099}.tar``, globs, ``pipe:`` commands,
    fsspec URLs); relative paths resolve against the working directory. Default: ``path``."""
    samples: int | None = None
    """format wds: samples in one pass over the shards (sets the epoch length); None = counted once from the tar
    headers (reads every shard once at start-up)."""
    split: str | None = "train"
    """format wds: keep samples whose record says ``split`` is this (``prepare dicom``/``wsi`` write train/eval);
    samples without a split are always kept; None = keep every sample."""

    def __post_init__(self):
        if self.weight <= 0:
            raise ConfigError(f"data.datasets[{self.path}].weight must be > 0, got {self.weight}")
        if self.format == "jsonl":  # one name for conversation JSONL in code; both are accepted in YAML
            self.format = "conversation"
        if self.format == "wds" and not (self.shards or self.path):
            raise ConfigError("data.datasets[].format=wds needs shards (or path)")


@dataclass
class DataConfig:
    """Training data."""

    datasets: list[DatasetConfig] = field(default_factory=list)
    """Mixture components."""
    epoch_size: int | None = None
    """Samples per mixture epoch; None = sum of dataset sizes."""
    shuffle_buffer: int = 1000
    """format wds: samples each stream reader holds for shuffling (0 = shard order)."""
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
class DPOConfig:
    """Preference tuning (``trainer.dpo``): stages ``dpo``, ``simpo`` and ``orpo`` (:mod:`medmm.training.stages.dpo`)."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """Stage dpo: sigmoid = DPO (conservative DPO with ``label_smoothing``); ipo = IPO on per-token mean log-ratios;
    hinge = SLiC; robust = rDPO, unbiased under label noise ``label_smoothing``. Stages simpo/orpo: sigmoid."""
    beta: float = 0.1
    """Strength of the reference (dpo); reward scale (simpo, usually 2-2.5); weight of the odds-ratio term (orpo)."""
    label_smoothing: float = 0.0
    """Probability that a pair's labels are flipped (sigmoid, robust, simpo); 0 = trust every pair."""
    rpo_alpha: float = 0.0
    """Weight of an SFT term, the chosen answer's NLL per token (RPO; dpo and simpo). 0 = none; orpo always has it."""
    reference: Literal["adapter", "copy", "precomputed"] = "adapter"
    """Stage dpo: adapter = this model with its LoRA adapter disabled (peft ``disable_adapter()``; needs a new adapter
    and every other part frozen); copy = a frozen copy of the starting model, sharded by ZeRO-3 like the policy;
    precomputed = log-probs read from ``reference_file`` (``medmm prepare dpo-reference``)."""
    reference_file: str | None = None
    """reference precomputed: the file written by ``medmm prepare dpo-reference --config C --out FILE``."""
    simpo_gamma: float = 0.5
    """Stage simpo: target reward margin (TRL ``simpo_gamma``)."""
    eval_path: str | None = None
    """Held-out preference pairs (JSONL) scored before training and every ``trainer.eval_every`` steps:
    eval_loss, eval_reward_accuracy, eval_reward_margin, eval_chosen_prob in ``metrics.jsonl``."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ConfigError(f"trainer.dpo.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"trainer.dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha < 0:
            raise ConfigError(f"trainer.dpo.rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.reference == "precomputed" and not self.reference_file:
            raise ConfigError("trainer.dpo.reference=precomputed needs trainer.dpo.reference_file "
                              "(medmm prepare dpo-reference --config C --out FILE)")


@dataclass
class TrainerConfig:
    """The DeepSpeed training loop."""

    output_dir: str = "runs/train"
    """Run folder: checkpoints/, tb/, metrics.jsonl, checkpoint/ (final model)."""
    deepspeed: str = "configs/deepspeed/zero2.json"
    """DeepSpeed JSON config (ZeRO stage, offload); batch sizes and clipping are filled in from here. A repository
    path (``configs/deepspeed/...``) that the working directory lacks is read from the copy medmm ships."""
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
    """A registered training stage (``medmm list stages`` prints them, one line each); each reads its own section
    of this config (the stage class's ``section``)."""
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
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """Preference tuning settings of stages dpo, simpo and orpo."""

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
    label_cols: list[str] = field(default_factory=list)
    """Several 0/1 label columns (a multi-task binary head, one logit each; replaces ``label_col``): a blank cell
    is a missing label, masked out of the loss and the metrics (ROC-AUC averaged over tasks with both classes)."""
    delimiter: str | None = None
    """Field separator; None = tab for .tsv/.txt files, comma otherwise."""
    split: Literal["scaffold", "scaffold_deterministic", "stratified", "random", "none"] = "scaffold"
    """scaffold (chemprop's balanced Bemis-Murcko split, molecules only) | scaffold_deterministic (the MoleculeNet /
    OGB split of Hu et al. 2020: scaffolds of the SMILES as written, largest groups first, no seed) | stratified |
    random into train/validation/test by ``fractions``; none = all of ``path`` trains, and ``eval_path`` is both
    the validation and the test part."""
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
    """A registered featuriser (``medmm list featurisers``)."""
    data: HeadDataConfig = field(default_factory=HeadDataConfig)
    loader: str = "mol_graph"
    """A registered input loader matching the encoder (``medmm list loaders``)."""
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="mol_gin", trainable="full"))
    """The encoder (or slide aggregator); ``trainable: frozen`` trains the head alone (a probe)."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Input preprocessing (saved in the checkpoint)."""
    type: str = "mlp"
    """A registered head (``medmm list heads``)."""
    hidden: int = 128
    """mlp: hidden width."""
    dropout: float = 0.1
    """Dropout before the output layer."""
    feature_dropout: float | None = None
    """Dropout on the ``mol_features`` the head reads (None = ``dropout``). The MoleculeNet benchmark uses 0: on
    HIV, dropping fingerprint bits and descriptors at the input cost ~1.5 ROC-AUC points."""
    mol_features: Literal["none", "morgan", "rdkit2d", "morgan+rdkit2d"] = "none"
    """molecules + mol_graph: molecule-level features the head's MLP reads beside the pooled graph (chemprop's
    ``features_generator``), through their own dropout (``head.feature_dropout``): morgan = the
    ``preprocess.fingerprint_bits``-bit Morgan fingerprint of radius ``preprocess.fingerprint_radius``; rdkit2d =
    RDKit's 2D descriptors (``medmm.io.molecules.rdkit2d``: log-squashed, standardised with the mean and std of
    the training molecules, clipped to ±5); morgan+rdkit2d = both."""
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
        for name in ("dropout", "feature_dropout"):
            p = getattr(self, name)
            if p is not None and not 0 <= p < 1:
                raise ConfigError(f"head.{name} must be in [0, 1), got {p}")
        if self.data.split in ("scaffold", "scaffold_deterministic") and self.featuriser != "molecules":
            raise ConfigError(f"head.data.split={self.data.split} needs molecules (head.featuriser: molecules)")
        if self.data.label_cols and (self.objective != "binary" or self.featuriser != "molecules"):
            raise ConfigError("head.data.label_cols (multi-task) needs head.objective: binary and molecules")
        if self.data.label_cols and self.data.split == "stratified":
            raise ConfigError("head.data.label_cols: a multi-task head takes split scaffold, scaffold_deterministic "
                              "or random")
        if self.data.split == "none" and not self.data.eval_path and self.data.path:
            raise ConfigError("head.data.split=none needs head.data.eval_path (the held-out file)")
        if self.objective == "binary" and self.classes and len(self.classes) != 2:
            raise ConfigError(f"head.objective=binary takes two classes, got {self.classes}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"head.classes has duplicates: {self.classes}")
        if self.mol_features != "none" and (self.featuriser != "molecules" or self.loader != "mol_graph"
                                            or self.type != "mlp"):
            raise ConfigError(f"head.mol_features={self.mol_features} joins a graph encoder's readout: it needs "
                              "head.featuriser: molecules, head.loader: mol_graph and head.type: mlp")
        if self.objective == "multiclass" and self.calibration != "none":
            raise ConfigError("head.calibration=temperature is for objective binary; set head.calibration: none")


@dataclass
class IndexConfig:
    """``medmm index build``: how documents are chunked and indexed (BM25 + dense, fused by reciprocal rank)."""

    chunk_words: int = 200
    """Documents longer than this many words are split into overlapping chunks (``ID#n``)."""
    chunk_overlap: int = 40
    """Words shared by consecutive chunks."""
    bm25_k1: float = 1.5
    """BM25 term-frequency saturation."""
    bm25_b: float = 0.75
    """BM25 length normalisation."""
    dense_encoder: str = "lsa"
    """A registered dense encoder (``medmm list dense-encoders``), or none = BM25 only."""
    dense_model: str | None = None
    """The encoder's folder (biencoder, sentence_transformers)."""
    dense_dim: int = 256
    """lsa: vector size."""
    rrf_k: int = 60
    """Reciprocal-rank fusion constant."""
    rrf_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Fusion weights of (BM25, dense); ``medmm index build --tune`` picks them and ``rrf_k`` on training queries.
    A weight of 0 leaves that retriever out of the fused mode (what tuning chooses when fusing does not help)."""
    depth: int = 100
    """Hits each retriever contributes to the fusion."""
    seed: int = 0
    """Seed of the SVD (lsa)."""

    def __post_init__(self):
        if self.chunk_words <= 0 or not 0 <= self.chunk_overlap < self.chunk_words:
            raise ConfigError(f"index: need chunk_words > chunk_overlap >= 0, got {self.chunk_words}, "
                              f"{self.chunk_overlap}")
        if self.rrf_k < 0 or self.depth < 1 or self.dense_dim < 2:
            raise ConfigError("index: rrf_k >= 0, depth >= 1 and dense_dim >= 2")
        if len(self.rrf_weights) != 2 or min(self.rrf_weights) < 0 or max(self.rrf_weights) <= 0:
            raise ConfigError(f"index.rrf_weights: two weights >= 0 (BM25, dense), not both 0; got {self.rrf_weights}")


@dataclass
class RetrieverStageConfig:
    """The ``retriever`` stage: a bi-encoder trained contrastively (in-batch negatives) on query-document pairs."""

    pairs: str = "icd10cm"
    """icd10cm = ICD-10-CM short name -> long name pairs of the codes outside the benchmark split; or a JSONL file of
    ``{"query", "document"}`` pairs."""
    test_fraction: float = 0.2
    """icd10cm: share of codes held out for the normalisation benchmark (never trained on)."""
    eval_pairs: int = 1000
    """Training pairs held out to report validation recall@1 (in-batch)."""
    init: Literal["lsa", "random"] = "lsa"
    """Start from an LSA projection fitted on the documents, or from random weights."""
    dim: int = 256
    """Embedding size."""
    temperature: float = 0.05
    """Softmax temperature of the InfoNCE loss."""
    limit: int | None = None
    """Use at most this many training pairs (quick runs)."""

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"retriever.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.temperature <= 0 or self.dim < 2 or self.eval_pairs < 0:
            raise ConfigError("retriever: temperature > 0, dim >= 2, eval_pairs >= 0")


@dataclass
class ValueStageConfig:
    """The ``value`` stage: a value head on a trained model's last hidden state, regressed on answer rewards."""

    model: str = ""
    """The medmm model folder the head is put on (its LLM stays frozen); the output folder is it plus the head."""
    source: Literal["labels", "samples"] = "samples"
    """labels = conversation records whose final answer carries a ``value`` (or ``reward``) number; samples =
    Monte-Carlo returns: ``samples`` answers sampled from the model per record, scored by ``reward`` against the
    record's reference."""
    reward: str = "exact_match"
    """source samples: a registered reward (``medmm list rewards``)."""
    samples: int = 8
    """source samples: answers sampled per record."""
    temperature: float = 1.0
    """source samples: sampling temperature."""
    max_new_tokens: int = 64
    """source samples: tokens per sampled answer at most."""
    steps: Literal["answer", "line", "sentence"] = "line"
    """Which prefixes of each answer are trained on its return: the whole answer only, or also every prefix
    ending a line / a sentence (what the step-level searches value_beam and mcts score)."""
    width: int = 256
    """Hidden units of the head's MLP; 0 = one linear layer."""
    eval_fraction: float = 0.1
    """Share of records held out (whole records, with all their answers) for validation MSE and ranking accuracy."""
    limit: int | None = None
    """Use at most this many records (quick runs)."""

    def __post_init__(self):
        if self.samples < 1 or self.max_new_tokens < 1 or self.width < 0 or self.temperature < 0:
            raise ConfigError("value: samples >= 1, max_new_tokens >= 1, width >= 0, temperature >= 0")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"value.eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass
class MolPretrainConfig:
    """The ``mol_pretrain`` stage: GNN pre-training on SMILES (self-supervised; ``supervised`` adds the files' labels; no
    LLM)."""

    data_dir: str = "../shared/data/molecules/moleculenet"
    """Folder of the MoleculeNet files whose SMILES are pooled (chemprop's copies: bbbp.csv, hiv.csv.gz, ...)."""
    datasets: list[str] = field(default_factory=lambda: ["bbbp", "bace", "clintox", "tox21", "hiv"])
    """MoleculeNet sets (``medmm.data.featurisers.molecules.MOLECULENET``) whose SMILES form the corpus."""
    exclude_test_of: list[str] = field(default_factory=lambda: ["bbbp", "bace", "clintox", "tox21", "hiv"])
    """Benchmarks whose ``scaffold_deterministic`` test molecules (0.8/0.1/0.1) are removed from the corpus,
    matched by standardised canonical SMILES (so a test molecule of one set is also removed from the others)."""
    limit: int | None = None
    """Rows read per corpus file at most (quick runs); the excluded test molecules always come from whole files."""
    workers: int = 2
    """Featurisation worker processes (0 = in this process)."""
    objectives: list[str] = field(default_factory=lambda: ["attr_mask", "contrastive"])
    """attr_mask (Hu et al. 2020: predict the element of masked atoms), contrastive (GraphCL: NT-Xent between two
    augmented views of each molecule) and/or supervised (the label columns of ``datasets``, missing ones masked)."""
    mask_rate: float = 0.15
    """attr_mask: share of each molecule's atoms whose element is hidden (at least one atom)."""
    drop_node_rate: float = 0.2
    """contrastive: share of atoms dropped in the second view."""
    drop_edge_rate: float = 0.2
    """contrastive: share of bonds dropped in the second view."""
    temperature: float = 0.1
    """contrastive: NT-Xent temperature."""
    contrastive_weight: float = 1.0
    """contrastive: weight of the NT-Xent term beside the masking loss."""
    supervised_weight: float = 1.0
    """supervised: weight of the masked multi-task BCE on the label columns of ``datasets`` (validation and test
    molecules of ``exclude_test_of`` unlabelled)."""
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="mol_gin", trainable="full"))
    """The GNN being pre-trained (its weights are saved as ``encoder.safetensors`` for ``head.encoder.checkpoint``)."""
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(
        mol_largest_fragment=False, mol_neutralise=False, mol_canonical_tautomer=False, mol_max_heavy_atoms=1000))
    """Standardisation; default: the SMILES as written, as the MoleculeNet protocol (fine-tuning should match)."""

    def __post_init__(self):
        bad = sorted(set(self.objectives) - {"attr_mask", "contrastive", "supervised"})
        if bad or not self.objectives:
            raise ConfigError("mol_pretrain.objectives: choose from attr_mask, contrastive, supervised "
                              f"(got {self.objectives})")
        for name in ("mask_rate", "drop_node_rate", "drop_edge_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"mol_pretrain.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"mol_pretrain.temperature must be positive, got {self.temperature}")


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
    retriever: RetrieverStageConfig = field(default_factory=RetrieverStageConfig)
    """Stage ``retriever``."""
    value: ValueStageConfig = field(default_factory=ValueStageConfig)
    """Stage ``value``."""
    mol_pretrain: MolPretrainConfig = field(default_factory=MolPretrainConfig)
    """Stage ``mol_pretrain``."""


@dataclass
class DecodingConfig:
    """How answers are decoded: a strategy registered in ``medmm.inference.strategies`` and its own settings."""

    strategy: str = "greedy"
    """A registered decoding strategy (``medmm list strategies``; ``python infer.py --help`` adds their settings)."""
    max_new_tokens: int = 64
    """Tokens generated at most."""
    seed: int = 0
    """Seed for sampling and search (the same seed gives the same answer)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The strategy's own settings (e.g. ``num_beams``, ``temperature``, ``draft``); names, types and defaults
    come from its registry entry, and a setting the strategy does not take is an error."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"decoding.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.params, dict):
            raise ConfigError("decoding.params must be a mapping {setting: value}")


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
    rag: str | None = None
    """A ``medmm index build`` folder: retrieved passages enter the prompt with numbered citations."""
    rag_top_k: int = 3
    """Passages retrieved per question with ``rag``."""


# --------------------------------------------------------------------------------------------
# The other commands' settings (built from flags, not YAML): DICOM preparation, WSI tiling, the report chain,
# the DICOM listener. They live here so every layer can take them without importing the command's module.


def check_aet(aet: str, what: str) -> str:
    """A DICOM AE title, stripped: 1-16 printable characters without a backslash (ValueError naming ``what``)."""
    aet = aet.strip()
    if not aet or len(aet) > 16 or "\\" in aet or not aet.isprintable():
        raise ValueError(f"{what}: '{aet}' is not a valid AE title (1-16 printable characters, no backslash)")
    return aet


def parse_destination(text: str, what: str = "--forward-to") -> dict:
    """``AET@host:port`` (C-STORE) or an ``http(s)://`` DICOMweb root (STOW-RS) -> ``{kind, url, aet, host, port}``."""
    if text.startswith(("http://", "https://")):
        return {"kind": "dicomweb", "url": text}
    try:
        aet, hostport = text.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        return {"kind": "dimse", "aet": check_aet(aet, what), "host": host, "port": int(port)}
    except ValueError as e:
        raise ValueError(f"{what} '{text}': use AET@host:port or an http(s):// DICOMweb URL ({e})") from e


@dataclass
class DicomPrepareOptions:
    """How ``prepare dicom`` preprocesses and protects."""

    window: str | None = None
    """Window preset (lung, mediastinum, bone, brain, abdomen); None = ``window_fallback``."""
    window_fallback: Literal["file", "minmax"] = "file"
    """Without a preset: file = the file's own window (a single image: its VOI transform), else min-max; minmax."""
    spacing: tuple[float, float, float] | None = None
    """Resample volumes to this spacing in mm (slice, row, column) before resizing; None keeps the grid."""
    size_2d: int = 224
    """Side of 2D images."""
    size_3d: tuple[int, int, int] = (32, 128, 128)
    """(D, H, W) of volumes."""
    on_gap: str = "keep"
    """Missing slices in a volume: keep (one volume, gaps reported), split (one volume per run), reject."""
    keep_phi: bool = False
    """Write original identifiers (off by default)."""
    salt: str | None = None
    """Secret that fixes pseudonyms, UID mapping and date shifts; the same salt gives the same mapping.
    None: ``$MEDMM_DEID_SALT``, else the random one in ``OUT/.deid_salt`` (written on the first run)."""
    keep_report_phi: bool = False
    """Write report/VQA text as given, without removing the identifiers it names (off by default)."""
    task: str = "report"
    """report | vqa: what the CSV pairs with each study."""
    workers: int = 1
    """Worker processes."""
    shard_maxcount: int = 1000
    """Samples per shard."""
    eval_fraction: float = 0.2
    """Share of studies held out for evaluation (split by study)."""
    seed: int = 0
    """Seed of the train/eval split."""
    extra_meta: dict = field(default_factory=dict)
    """Extra fields written into the manifest."""


@dataclass
class WsiSettings:
    """What decides the tiles; a resumed run must use the same values."""

    mpp: float = 0.5
    """Microns per pixel of the tiles."""
    tile: int = 224
    """Tile side in pixels at ``mpp``."""
    min_tissue: float = 0.5
    """Least tissue fraction (Otsu mask) of a kept tile."""
    mask_mpp: float = 8.0
    """Microns per pixel of the tissue mask."""
    slide_mpp: float | None = None
    """Scan MPP for slides whose metadata has none."""
    backend: str = "auto"
    """Slide reader: auto | openslide | tifffile | dicom."""
    image_format: str = "jpg"
    """Tile encoding in the shards: jpg | png."""
    quality: int = 90
    """JPEG quality of the tiles."""
    features: str | None = None
    """Store tile features from this encoder (registry name) instead of pixels; None = pixels."""
    encoder_kwargs: dict = field(default_factory=dict)
    """Architecture overrides of the ``features`` encoder."""
    encoder_checkpoint: str | None = None
    """Local weights of the ``features`` encoder (UNI/CONCH-style)."""


@dataclass
class ReportConfig:
    """What the chain asks and how it writes the SR."""

    question: str = "Describe the findings."
    """The prompt the model answers for each study."""
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(max_new_tokens=64))
    """Decoding settings (greedy by default: the same study gives the same report)."""
    min_volume_slices: int = 8
    """A series with at least this many slices/frames goes through the volume modality (if the model has one)."""
    series_modalities: list[str] | None = None
    """Only consider series of these DICOM modalities (e.g. ["CT", "MR"]); None: any image series."""
    sr_series_number: int = 9901
    """Series Number of the SR series."""
    sr_series_description: str = "medmm AI report (UNVERIFIED)"
    """Series Description of the SR series."""
    institution_name: str | None = None
    """Institution Name written into the SR."""
    max_decoded_mib: int = 512
    """Pixel budget of one study: MiB of decoded pixels (float32, computed from the headers before anything is
    decoded) the files the model reads may need; over it the study is a DicomError (HTTP 422). It also bounds
    what a Deflated file may inflate to. Raise it for thin-slice CT (512x512 slices: 1 MiB each)."""

    def __post_init__(self):
        if self.min_volume_slices < 2:
            raise ValueError("min_volume_slices must be at least 2")
        if self.max_decoded_mib < 1:
            raise ValueError("max_decoded_mib must be at least 1")
        if not self.question.strip():
            raise ValueError("question must not be empty")


@dataclass
class ListenerConfig:
    """The SCP's identity, who may send, and its bounds."""

    aet: str = "MEDMM"
    """Our AE title; callers must address it (called AE title is checked)."""
    host: str = "127.0.0.1"
    """Bind address. Loopback by default; give the hospital network's interface explicitly."""
    port: int = 11112
    """TCP port."""
    allowed_aets: list[str] = field(default_factory=list)
    """Calling AE titles allowed to store; every other association is rejected."""
    study_timeout_s: float = 5.0
    """A burst of a study is complete when no instance of it came for this long."""
    max_queue: int = 16
    """Studies being collected, waiting or in inference at once; a new study beyond this gets 0xA700."""
    max_instances: int = 5000
    """Instances accepted per burst of a study; more get 0xA700."""
    max_batch: int = 8
    """Studies waiting in the queue that the worker reports together in one batched ``generate`` (1: one by one)."""
    forward_to: str | None = None
    """``AET@host:port`` or a DICOMweb URL; None: SRs stay in ``out_dir/sr``."""
    retry_s: float = 60.0
    """How long SR delivery is retried (with back-off) after its first failure before the SR is kept in
    ``out_dir/undelivered``; 0: one attempt."""
    amend_window_s: float = 3600.0
    """How long a study's received instances are kept after its last SR, so that a later burst is reported with
    all of them (the new SR amends the previous one either way)."""
    out_dir: str = "runs/pacs"
    """SRs (``sr/``), undelivered SRs (``undelivered/``), the study log (``studies.jsonl``) and, by default,
    the spool."""
    spool_dir: str | None = None
    """Where received instances wait for inference (default ``out_dir/spool``); emptied after ``amend_window_s``."""
    keep_studies: bool = False
    """Keep received instances after processing, forever (default: delete them after ``amend_window_s``)."""
    tls_cert: str | None = None
    """PEM certificate (chain) of the listener: with ``tls_key``, it speaks DICOM TLS only; None: plain DIMSE."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    tls_ca: str | None = None
    """PEM CA bundle: callers must present a client certificate signed by it (mutual TLS); needs ``tls_cert``."""
    audit_log: str | None = None
    """One JSON line per association and per C-STORE/C-ECHO (no header values, no UIDs), created 0600."""

    def __post_init__(self):
        self.aet = check_aet(self.aet, "--aet")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("--tls-ca (client certificates) needs --tls-cert and --tls-key")
        self.allowed_aets = [check_aet(a, "--allowed-aets") for a in self.allowed_aets if a.strip()]
        if not self.allowed_aets:
            raise ValueError("--allowed-aets: list the calling AE titles that may send studies (e.g. CT01,PACS)")
        if self.study_timeout_s <= 0 or self.max_queue < 1 or self.max_instances < 1 or self.max_batch < 1:
            raise ValueError("study_timeout_s, max_queue, max_instances and max_batch must be positive")
        if self.retry_s < 0 or self.amend_window_s < 0:
            raise ValueError("retry_s and amend_window_s must not be negative")
        if self.forward_to:
            parse_destination(self.forward_to)


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
    """Load ``cls`` from a YAML file (``safe_load``) plus dotted overrides.

    ``path`` is read as given; a repository path the working directory lacks (``configs/demo.yaml`` run from
    elsewhere) is read from the recipes medmm ships (:func:`medmm.utils.locate`).
    """
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(locate(path)) as f:
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
