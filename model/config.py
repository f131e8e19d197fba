"""Model hyperparameters: frozen dataclasses, loaded from the YAML presets and saved in every checkpoint.

Every choice the decision record (``spec/model.md``) makes is a field here, so the paper's variant stays one
flag away. Unknown keys raise :class:`~model.errors.ConfigError` naming them; invalid values are checked at
construction and named too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from model.errors import CheckpointError, ConfigError, UnknownModalityError

PRESETS_DIR = Path(__file__).parent / "presets"
KNOWN_MODALITIES = ("t1", "t2", "t1ce", "flair", "pd")
# Names other datasets use for the same sequences (BraTS 2023+, BraTS-Toolkit, WMH/IXI capitals).
MODALITY_ALIASES = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "fla": "flair", "t1gd": "t1ce"}


def canonical_modality(name: str) -> str:
    """Model-vocabulary name of a modality (``"T1C"`` -> ``"t1ce"``); unknown names raise."""
    key = str(name).strip().lower()
    key = MODALITY_ALIASES.get(key, key)
    if key not in KNOWN_MODALITIES:
        raise UnknownModalityError(
            f"unknown modality {name!r}: expected one of {', '.join(KNOWN_MODALITIES)} "
            f"(or an alias: {', '.join(MODALITY_ALIASES)})"
        )
    return key


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class PreprocessConfig:
    """Volume <-> slices (spec "Pre- and post-processing")."""

    image_size: int = 192  # in-plane crop/pad size of every slice
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # inside the brain mask; authors: (0, 100)
    background_threshold: float = 0.0  # brain mask = union over available modalities of value > this
    min_brain_fraction: float = 0.02  # training uses slices whose brain mask covers more than this fraction

    def __post_init__(self) -> None:
        lo, hi = self.clip_percentiles
        _check(0 <= lo < hi <= 100, f"clip_percentiles must satisfy 0 <= lo < hi <= 100, got {self.clip_percentiles}")
        _check(
            self.image_size >= 8 and self.image_size % 8 == 0,
            f"image_size must be a positive multiple of 8, got {self.image_size}",
        )


@dataclass(frozen=True)
class AutoencoderConfig:
    """Stage 0: single-channel autoencoder shared by all modalities (authors: VQ-GAN f=8)."""

    kind: Literal["vq", "kl"] = "vq"
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 4)  # len-1 downsamplings: 4 levels -> f=8
    num_res_blocks: int = 2
    latent_channels: int = 4
    codebook_size: int = 8192
    commitment_beta: float = 0.25
    codebook_update: Literal["loss", "ema"] = "loss"  # authors: codebook loss; ema: EMA codebook + dead-code restart
    codebook_decay: float = 0.99  # ema only
    mid_attention: bool = True
    norm_groups: int = 32
    quantize_on_decode: bool = True  # VQ: snap diffusion outputs to the codebook before decoding (CompVis)
    kl_weight: float = 1e-6  # kind=kl only
    # loss: L1 + codebook + perceptual (1-SSIM in place of LPIPS, which cannot be downloaded) + PatchGAN hinge
    perceptual: Literal["ssim", "none"] = "ssim"
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    disc_layers: int = 3
    disc_channels: int = 64
    disc_weight: float = 1.0
    disc_start: int = 0  # stage-0 step at which the adversarial term switches on
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)

    def __post_init__(self) -> None:
        _check(self.kind in ("vq", "kl"), f"autoencoder.kind must be 'vq' or 'kl', got {self.kind!r}")
        _check(len(self.channel_mult) >= 2, f"autoencoder.channel_mult needs >= 2 levels, got {self.channel_mult}")
        _check(
            all(
                (self.base_channels * m) % min(self.norm_groups, self.base_channels * m) == 0 for m in self.channel_mult
            ),
            f"autoencoder widths {[self.base_channels * m for m in self.channel_mult]} must be divisible by "
            f"norm_groups={self.norm_groups}",
        )
        _check(
            self.perceptual in ("ssim", "none"), f"autoencoder.perceptual must be ssim|none, got {self.perceptual!r}"
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class StructureConfig:
    """Stage 1: structure/style disentanglement (paper Sec. 2.2-2.3)."""

    channels: tuple[int, ...] = (32, 64, 128, 256)  # structure encoder widths per scale (4 scales)
    dropout: float = 0.3  # in the first conv of each scale's residual pair (authors)
    hfib: bool = True  # ablation "w/o HFIB" when False
    hfib_fusion: Literal["add", "concat"] = "concat"  # paper Eq. 2 `x + high` | authors' conv([x, high])
    hfib_sigma_init: float = 1.0
    mmsf: bool = True  # False: plain mean of the available modalities' features (ablation)
    msse: bool = True  # False: F_s = F_L (ablation "w/o MSSE")
    msse_heads: int = 4
    msse_alpha_init: float = 0.5
    msse_alpha_learnable: bool = True  # paper: learnable; authors: fixed 0.5
    # how the finer scales reach the deepest grid: authors' bilinear (no antialiasing: 192 -> 24 reads 2x2 of every
    # 8x8 block) | area (box average over each block; docs/model.md "Measured changes")
    msse_resize: Literal["bilinear", "area"] = "bilinear"
    style_dim: int = 8
    style_base_channels: int = 32
    style_downsamples: int = 4
    decoder_res_blocks: int = 4  # AdaIN residual blocks of each reconstruction decoder
    decoder_mlp_channels: int = 256
    segmentation: bool = True  # train the shared segmentation decoder (off for datasets without labels)
    seg_classes: int = 4  # [background, WT, TC, ET]
    # losses (weights from the authors' code; the paper gives none)
    seg_weight: float = 2.0
    seg_bce_weight: float = 1.0  # L_seg = bce_weight * BCE + (1 - soft Dice)
    # the soft Dice of L_seg: pooled over every channel, background included (the spec's "soft Dice"; predicting no
    # tumour already scores ~0.9 Dice) | the mean of the tumour regions' Dice, each over the batch (nnU-Net's form)
    seg_dice: Literal["pooled", "regions"] = "pooled"
    sc_weight: float = 0.1
    sa_weight: float = 1.0
    # the DCT term of L_sa: SSIM of the DCT amplitudes with data range max - min (authors; dominated by the DC
    # coefficient, a sigma-2 blur scores 0.007) | of log(1 + amplitude) normalised per image to [0, 1]
    sa_dct: Literal["amplitude", "log_amplitude"] = "amplitude"
    kl_weight: float = 0.05
    tau_init: float = 1.0 / 0.07  # style-consistency temperature (learnable, clamped to [1, tau_max])
    tau_max: float = 100.0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        _check(len(self.channels) >= 2, f"structure.channels needs >= 2 scales, got {self.channels}")
        _check(
            self.hfib_fusion in ("add", "concat"), f"structure.hfib_fusion must be add|concat, got {self.hfib_fusion!r}"
        )
        _check(self.msse_resize in ("bilinear", "area"), f"structure.msse_resize must be bilinear|area, "
               f"got {self.msse_resize!r}")
        _check(self.sa_dct in ("amplitude", "log_amplitude"), f"structure.sa_dct must be amplitude|log_amplitude, "
               f"got {self.sa_dct!r}")
        _check(self.seg_dice in ("pooled", "regions"),
               f"structure.seg_dice must be pooled|regions, got {self.seg_dice!r}")
        _check(
            self.channels[-1] % self.msse_heads == 0,
            f"structure.channels[-1]={self.channels[-1]} must be divisible by msse_heads={self.msse_heads}",
        )
        _check(
            1.0 <= self.tau_init <= self.tau_max,
            f"structure.tau_init={self.tau_init} must lie in [1, tau_max={self.tau_max}]",
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """Stage 2 denoiser (CompVis UNet, concat conditioning)."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (1, 2)  # level indices with self-attention (24 -> 12 -> 6: 12x12 and 6x6)
    head_channels: int = 32
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check(
            all(0 <= lvl < len(self.channel_mult) for lvl in self.attention_levels),
            f"unet.attention_levels {self.attention_levels} must index channel_mult {self.channel_mult}",
        )
        widths = [self.base_channels * m for m in self.channel_mult]
        _check(
            all(w % min(self.norm_groups, w) == 0 and w % self.head_channels == 0 for w in widths),
            f"unet widths {widths} must be divisible by norm_groups={self.norm_groups} "
            f"and head_channels={self.head_channels}",
        )


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule, training objective and sampler defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"  # linear in sqrt(beta) (CompVis "linear")
    # what the UNet predicts: eps (paper) | z0 ("sample") | v = sqrt(abar) eps - sqrt(1 - abar) z0 (Salimans 2022)
    prediction: Literal["epsilon", "sample", "v"] = "epsilon"
    latent_scale: float = 1.0  # authors: no latent std scaling with the VQ autoencoder
    latent_scale_from_data: bool = False  # the trainer sets latent_scale = 1/std(z) of the training latents (KL)
    missing_weight: float = 1.0  # stage-2 loss weight of the missing modalities' latent channels (paper: 1)
    ema_decay: float = 0.9999
    lr: float = 1e-4
    weight_decay: float = 0.0
    default_steps: int = 50  # service default; see docs/model.md for the measured steps table
    eta: float = 1.0  # authors' DDIM default
    replace_known: bool = False  # inpainting-style: known modalities' latents replaced by their noised truth
    condition_known: bool = False  # the UNet also sees the known modalities' clean latents + which they are (paper:
    # F_s only)
    # beyond the paper: + image_weight * (L1 + 1 - SSIM) of the frozen decoder's image of the predicted z0 against the
    # true image, on one missing modality per sample, over an image_crop-squared latent window (paper: 0, latent MSE)
    image_weight: float = 0.0
    image_crop: int = 12
    # beyond the paper: inference averages 1 (paper), 2 (+ mirrored left-right) or 4 (+ both shifted by half a
    # latent cell) views of every slice, each mapped back (model.slices.test_time_views)
    test_time_views: int = 1

    def __post_init__(self) -> None:
        _check(
            0 < self.beta_start < self.beta_end < 1,
            f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}",
        )
        _check(self.beta_schedule in ("scaled_linear", "linear"), f"unknown beta_schedule {self.beta_schedule!r}")
        _check(
            1 <= self.default_steps <= self.num_train_timesteps,
            f"default_steps={self.default_steps} must lie in [1, {self.num_train_timesteps}]",
        )
        _check(0.0 <= self.eta <= 1.0, f"eta must lie in [0, 1], got {self.eta}")
        _check(
            self.prediction in ("epsilon", "sample", "v"),
            f"prediction must be epsilon|sample|v, got {self.prediction!r}",
        )
        _check(self.latent_scale > 0 and self.missing_weight > 0, "latent_scale and missing_weight must be positive")
        _check(self.test_time_views in (1, 2, 4), f"test_time_views must be 1, 2 or 4, got {self.test_time_views}")
        _check(self.image_weight >= 0 and self.image_crop >= 1, "image_weight must be >= 0 and image_crop >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Training loop defaults (overridable from the command line)."""

    batch_size: int = 9
    stage_batch_sizes: tuple[int, ...] = ()  # per stage (0, 1, 2), overriding batch_size; empty: batch_size for all
    crop_stage0: int = 0  # random in-plane crop for stages 0-1 (0: whole slice); the authors crop in stage 0
    crop_stage1: int = 0  # (fully convolutional parts; MSSE then attends over a smaller grid)
    stage1_full_steps: int = 0  # the last N steps of stage 1 on whole slices (F_s of a crop != F_s of the slice)
    stage1_full_batch: int = 0  # batch size of those steps (0: batch_size)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # per stage, after warmup_steps of linear warm-up
    warmup_steps: int = 0
    cpu_bf16: bool = False  # bf16 autocast on the CPU in stages 0-1 (CUDA always uses bf16)
    stage0_train: Literal["all", "decoder"] = "all"  # decoder: the encoder frozen, so the latents (and a trained
    # stage 2 on them) stay valid while the decoder trains on (fine-tunes from --init)
    fs_cache_subsets: int = 0  # stage 2: F_s precomputed for this many random input subsets per slice (0: on the fly)
    stage2_mirror: bool = False  # stage 2 also trains on every slice mirrored left-right (its own latents and F_s in
    # the cache; each step picks a slice or its mirror at random): twice the subjects' anatomy (docs/model.md)
    stage2_shift: bool = False  # stage 2 also trains on every slice shifted by half a latent cell down and right
    # (new latents of the same anatomy: the encoder's grid falls elsewhere; the test-time views' shift, docs/model.md)
    stage2_gamma: float = 0.0  # > 0: stage 2 also trains on every slice with each modality's intensities remapped by
    # a random gamma in [1/(1+g), 1+g] (per slice and modality; on [0, 1]: background and maximum kept, the level
    # moved), so the output's level cannot be read off the inputs' exact intensities (docs/model.md)
    stage0_steps: int = 100_000
    stage1_steps: int = 50_000
    stage2_steps: int = 100_000
    log_every: int = 10
    val_every: int = 500
    ckpt_every: int = 500
    val_batches: int = 4
    grad_clip: float = 1.0
    num_workers: int = 0
    val_fraction: float = 0.1
    seed: int = 0
    test_fraction: float = 0.0  # subject-level test split, never trained on (with test_cases always in it)
    test_cases: tuple[str, ...] = ()  # case ids always held out for testing
    gates: bool = True  # stop between stages when a gate fails (docs/model.md "Gates"); --ignore-gates overrides
    gate_stage0_psnr: float = 28.0  # validation brain PSNR (dB) of the autoencoder
    gate_stage2_spread: float = 0.3  # PSNR spread (dB) across input subsets
    gate_stage2_ratio: float = 0.5  # z0 error at t = T-1 / error of the mean latent

    def __post_init__(self) -> None:
        _check(len(self.stage_batch_sizes) in (0, 3), f"train.stage_batch_sizes needs 3 values (stages 0, 1, 2), "
               f"got {self.stage_batch_sizes}")
        _check(self.lr_schedule in ("constant", "cosine"), f"train.lr_schedule must be constant|cosine, "
               f"got {self.lr_schedule!r}")
        _check(self.stage0_train in ("all", "decoder"), f"train.stage0_train must be all|decoder, "
               f"got {self.stage0_train!r}")
        _check(not (self.stage2_mirror or self.stage2_shift or self.stage2_gamma) or self.fs_cache_subsets > 0,
               "train.stage2_mirror, stage2_shift and stage2_gamma need train.fs_cache_subsets > 0 (their F_s come "
               "from the cache)")
        _check(0 <= self.stage2_gamma < 4, f"train.stage2_gamma must be in [0, 4), got {self.stage2_gamma}")


@dataclass(frozen=True)
class MSGLDMConfig:
    """Everything needed to rebuild a model; saved as ``config.json`` in each checkpoint directory."""

    name: str = "brats"
    modalities: tuple[str, ...] = ("t1", "t2", "t1ce", "flair")
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    chunk_size_cpu: int = 8  # slices per forward at inference on CPU
    chunk_size_cuda: int = 64  # ... on a GPU
    train_spacing: tuple[float, float, float] | None = None  # voxel size (mm) of the training data, for the record

    def __post_init__(self) -> None:
        _check(len(self.modalities) >= 1, "modalities must not be empty")
        mods = tuple(canonical_modality(m) for m in self.modalities)
        _check(len(set(mods)) == len(mods), f"modalities must be distinct, got {self.modalities}")
        object.__setattr__(self, "modalities", mods)
        _check(
            self.autoencoder.downsample_factor == self.structure.downsample_factor,
            f"the autoencoder downsamples by {self.autoencoder.downsample_factor} "
            f"(channel_mult {self.autoencoder.channel_mult}) but the structure encoder by "
            f"{self.structure.downsample_factor} (channels {self.structure.channels}): F_s must match the latent grid",
        )
        _check(
            self.preprocess.image_size % self.autoencoder.downsample_factor == 0,
            f"image_size {self.preprocess.image_size} not divisible by {self.autoencoder.downsample_factor}",
        )
        latent = self.preprocess.image_size // self.autoencoder.downsample_factor
        _check(
            latent % 2 ** (len(self.unet.channel_mult) - 1) == 0,
            f"latent size {latent} not divisible by the UNet's {2 ** (len(self.unet.channel_mult) - 1)}",
        )

    # ------------------------------------------------------------------ (de)serialisation

    @property
    def latent_size(self) -> int:
        return self.preprocess.image_size // self.autoencoder.downsample_factor

    @property
    def latent_channels(self) -> int:
        """Channels of the joint diffusion state: one latent per modality."""
        return self.autoencoder.latent_channels * len(self.modalities)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MSGLDMConfig:
        return _build(cls, data, "")

    def replace(self, overrides: dict[str, Any]) -> MSGLDMConfig:
        """Copy with dotted-key overrides, e.g. ``{"unet.base_channels": 32, "name": "x"}``."""
        data = self.to_dict()
        for key, value in overrides.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"unknown config key {key!r}")
                node = node[p]
            if leaf not in node:
                raise ConfigError(f"unknown config key {key!r}")
            node[leaf] = value
        return MSGLDMConfig.from_dict(data)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or '<root>'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {where or '<root>'}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = _SECTIONS.get(name) if cls is MSGLDMConfig else None
        if sub is not None:
            kwargs[name] = _build(sub, value, f"{where}{name}.")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_SECTIONS = {
    "preprocess": PreprocessConfig,
    "autoencoder": AutoencoderConfig,
    "structure": StructureConfig,
    "unet": UNetConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
}


def load_preset(name_or_path: str | Path) -> MSGLDMConfig:
    """A named preset (``brats``, ``wmh``, ``ixi``, ``tiny``) or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset {name_or_path!r}: expected one of {names} or a YAML file")
    data = yaml.safe_load(path.read_text()) or {}
    return MSGLDMConfig.from_dict(data)


def read_config(path: str | Path) -> MSGLDMConfig:
    """A checkpoint directory's ``config.json`` (torch-free: the API reads the serving model's modalities)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: no config.json")
    try:
        return MSGLDMConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid config.json in {path}: {exc}") from exc
