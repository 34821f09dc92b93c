"""Every config schema, registered in Hydra's ConfigStore.

A `*Job` is the whole config of one entry point (`python -m pipeline.train` composes a
TrainJob); a `*Config` is one node or group within it.

Each dataclass holds its keys' defaults, written once: `conf/*.yaml` extend the schemas and
hold only what differs. Hydra type-checks while it composes; `validate` then builds the
dataclasses, whose `__post_init__` checks ranges and names, so a typo or a bad value stops the
run before any data moves, with a message that names the key and what is allowed. Names that
select a builder (backbone, head) are declared here as data, the one list the builders'
registries accept: this module imports no torch, so a bad config fails in a moment. Data sources
are the readers registered in `pipeline.data.sources`, a module of the standard library alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.data.sources import SOURCES
from pipeline.errors import ConfigError

T = TypeVar("T")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming `key`, the bad `value` and what is `allowed`."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid; allowed: {allowed}")


def one_of(value: Any, key: str, allowed: Iterable[Any], nullable: bool = False) -> None:
    names = list(allowed)
    ok = value in names or (nullable and value is None)
    require(ok, key, value, ", ".join(["null"] * nullable + [str(name) for name in names]))


def mask_password(uri: str) -> str:
    """`uri` with any password replaced by ***: safe for params, files, logs and terminals."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def validate(cfg: DictConfig, schema: type[T]) -> T:
    """Build `schema` from a composed config (checking every value), or raise a ConfigError.

    The config is merged as plain values, so that a key Hydra added (`+trainer.max_epoch=3`)
    is refused by name rather than dropped."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {err}") from err


# --- data ----------------------------------------------------------------------------------


@dataclass
class DatasetConfig:
    """`dataset` group: what the images are and where their raw files come from."""

    name: str = MISSING
    # the reader of its raw files, registered in pipeline.data.sources
    source: str = MISSING
    # base URLs tried in order, each serving every downloaded file under its name
    mirrors: list[str] = field(default_factory=list)
    # an installed distribution that bundles the files: they are copied from it, not downloaded
    package: str | None = None
    # file name -> md5 of every file fetched, or extracted from a fetched archive
    checksums: dict[str, str] = field(default_factory=dict)
    channels: int = MISSING
    height: int = MISSING
    width: int = MISSING
    classes: list[str] = MISSING
    val_size: int = MISSING
    # None: the source's official test split; otherwise drawn from the pool like val
    test_size: int | None = None
    split_seed: int = 0

    def __post_init__(self) -> None:
        one_of(self.source, "dataset.source", SOURCES)
        one_of(self.channels, "dataset.channels", (1, 3))
        for key in ("height", "width"):
            value = getattr(self, key)
            require(value >= 8, f"dataset.{key}", value, "an integer >= 8")
        require(len(self.classes) >= 2, "dataset.classes", self.classes, "at least two names")
        require(self.val_size >= 0, "dataset.val_size", self.val_size, "an integer >= 0")
        if self.test_size is not None:
            require(self.test_size > 0, "dataset.test_size", self.test_size, "null or > 0")
        for mirror in self.mirrors:
            require(
                mirror.startswith(("http://", "https://", "file://")) and mirror.endswith("/"),
                "dataset.mirrors",
                mirror,
                "base URLs that start with http(s):// and end with '/'",
            )
        require(
            self.package is None or not self.mirrors,
            "dataset.mirrors",
            self.mirrors,
            f"none: dataset.package ({self.package}) bundles the files",
        )
        for name, md5 in self.checksums.items():
            require(
                len(md5) == 32 and all(c in "0123456789abcdef" for c in md5),
                f"dataset.checksums.{name}",
                md5,
                "a 32-digit lower-case hex md5",
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass
class PathsConfig:
    data_dir: str = "data"

    def raw_dir(self, dataset: str) -> Path:
        """Where the fetch stage leaves a dataset's files exactly as its mirrors serve them."""
        return Path(self.data_dir) / "raw" / dataset

    def processed_dir(self, dataset: str) -> Path:
        """Where the preprocess stage writes the split tensors and their meta.json."""
        return Path(self.data_dir) / "processed" / dataset


@dataclass
class PrepareJob:
    """`conf/data.yaml`: the fetch and preprocess stages."""

    dataset: DatasetConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    # seconds a connection may stall before the mirror counts as unreachable
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        require(0 < self.timeout_s <= 60, "timeout_s", self.timeout_s, "0 < seconds <= 60")


@dataclass
class AugmentConfig:
    """Training-batch augmentation on the device (LeCun 1998: flips, shifts of up to 2 px;
    He et al. 2015 and Lin et al. 2013: several input sizes)."""

    flip: bool = False
    max_shift: int = 0
    # multi-size training: each batch is resized by a factor drawn log-uniformly from
    # [low, high] (multiples of the dataset's size, like evaluation.scales), so GAP and SPP
    # heads learn every size they are tested at (0.75x to 2x) and a little below: a range's
    # end is the size learned least (LeNet-5-SPP on digits at 21 px: 94.4% trained from 21,
    # 98.1% from 18). fc heads, built for one size, always train at the dataset's.
    # [1, 1]: one size for every head
    scale_range: list[float] = field(default_factory=lambda: [0.65, 2.0])

    def __post_init__(self) -> None:
        require(0 <= self.max_shift <= 8, "data.augment.max_shift", self.max_shift, "0 to 8")
        scales = self.scale_range
        require(
            len(scales) == 2 and 0 < scales[0] <= scales[1] <= 8,
            "data.augment.scale_range",
            self.scale_range,
            "[low, high] with 0 < low <= high <= 8 ([1, 1]: one size)",
        )


@dataclass
class BatchConfig:
    """`data`: how training batches are cut and augmented."""

    batch_size: int = 128
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")


# --- model ---------------------------------------------------------------------------------

# the heads' names (pipeline.models.heads); backbones are open: the zoo's register themselves
# (pipeline/models/zoo/), and a user's own is named by `_target_`
HEAD_NAMES = ("fc", "gap", "spp")
ACTIVATIONS = ("relu", "tanh", "scaled_tanh", "sigmoid")
# trainable: LeCun's subsampling, the 2x2 sum times a coefficient plus a bias, per map
POOLINGS = ("max", "avg", "trainable")
# seed 000: the value outside the image is "a = 0 or x_0"
PADDING_MODES = ("zeros", "replicate")
# learned from data, or fixed to a classical bank (pipeline/models/banks.py)
FIRST_LAYERS = ("learned", "gabor", "prewitt", "sobel", "gaussian", "laplacian")
OUTPUTS = ("linear", "rbf")
STEMS = ("imagenet", "cifar")


@dataclass
class ModelConfig:
    """`model` group: a backbone (feature extractor) times a head (classifier).

    `model.backbone=lenet5,alexnet model.head=fc,gap,spp` is one Hydra sweep. Options left at
    null take the backbone's own value (LeNet-5: relu and max pooling; LeCun 1998: scaled tanh
    and trainable subsampling; AlexNet: dropout 0.5...), so a sweep over backbones stays
    faithful to each paper. Input shape and class count come from the dataset.
    """

    # a zoo network's name (pipeline/models/zoo/: lenet5, alexnet, nin...; checked when the
    # model is built, the zoo's modules import torch), or a network of your own package:
    # {_target_: my_package.MyNet, ...its arguments} (pipeline.models.backbones)
    backbone: Any = "lenet5"
    head: str = "fc"
    # null: the backbone's own (relu; lenet5_classic: scaled_tanh)
    activation: str | None = None
    # null: the backbone's own (lenet5, alexnet: max; lenet5_keras: avg; lenet5_classic: trainable)
    pooling: str | None = None
    padding_mode: str = "zeros"
    first_layer: str = "learned"
    # linear scores, or LeCun's RBF: minus the squared distance to fixed +-1 class codes
    output: str = "linear"
    # pixels added on every side of the input; null: enough to bring the dataset's images to
    # the backbone's design field (LeNet-5: 32, so MNIST's 28x28 gets 2; CIFAR's 32x32 gets 0)
    input_pad: int | None = None
    # widths of the hidden fully connected layers of the fc and spp heads; null: the backbone's
    # (LeNet-5: [84] = F6; AlexNet: [4096, 4096] times the width multiplier)
    hidden: list[int] | None = None
    # spp head: pyramid levels (n means n x n bins); null: LeNet [4, 2, 1], AlexNet [6, 3, 2, 1]
    spp_levels: list[int] | None = None
    # dropout before each hidden layer; null: the backbone's (LeNet-5: 0, AlexNet: 0.5)
    dropout: float | None = None
    # alexnet only: imagenet (11x11 stride 4) or cifar (5x5 stride 1) first layer; null:
    # imagenet for inputs of 64 px and more, cifar below
    stem: str | None = None
    # multiplies every layer's width, in the backbones that scale (alexnet, nin); null: 1.0
    width: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            target = self.backbone.get("_target_")
            ok = isinstance(target, str) and "." in target
            require(ok, "model.backbone._target_", target, "a dotted path: my_package.MyNet")
        else:
            allowed = "a zoo network's name (lenet5, alexnet...) or {_target_: my_package.MyNet}"
            require(isinstance(self.backbone, str), "model.backbone", self.backbone, allowed)
        one_of(self.head, "model.head", HEAD_NAMES)
        one_of(self.activation, "model.activation", ACTIVATIONS, nullable=True)
        one_of(self.pooling, "model.pooling", POOLINGS, nullable=True)
        one_of(self.padding_mode, "model.padding_mode", PADDING_MODES)
        one_of(self.first_layer, "model.first_layer", FIRST_LAYERS)
        one_of(self.output, "model.output", OUTPUTS)
        one_of(self.stem, "model.stem", STEMS, nullable=True)
        require(
            self.output == "linear" or self.head != "gap",
            "model.output",
            self.output,
            "linear with head=gap (its class maps are the scores; rbf needs an fc or spp head)",
        )
        if self.input_pad is not None:
            require(self.input_pad >= 0, "model.input_pad", self.input_pad, "null or >= 0")
        if self.hidden is not None:
            ok = all(width > 0 for width in self.hidden)
            require(ok, "model.hidden", self.hidden, "null or a list of widths > 0")
        if self.spp_levels is not None:
            ok = len(self.spp_levels) > 0 and all(level > 0 for level in self.spp_levels)
            require(ok, "model.spp_levels", self.spp_levels, "null or a non-empty list of ints > 0")
        if self.dropout is not None:
            require(0 <= self.dropout < 1, "model.dropout", self.dropout, "null or 0 <= p < 1")
        if self.width is not None:
            require(0 < self.width <= 4, "model.width", self.width, "null or 0 < width <= 4")

    @property
    def backbone_name(self) -> str:
        """The zoo name, or the class or function name of the user's `_target_`."""
        if isinstance(self.backbone, str):
            return self.backbone
        return self.backbone["_target_"].rpartition(".")[2]


# --- training ------------------------------------------------------------------------------


@dataclass
class TrainerConfig:
    """`trainer` group: where and how Lightning runs (`trainer=cpu|gpu|ddp`, then any key)."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    # bit-exact repeats on CPU (same config and seed -> same metrics); costs speed on GPU
    deterministic: bool = True
    max_epochs: int = 10
    # early stopping on val/acc after this many epochs without improvement; null: off
    early_stopping_patience: int | None = None
    # train/loss_step is logged every N steps
    log_every_n_steps: int = 50
    # Lightning's profiler by name (simple, advanced, pytorch): a report when fitting ends
    profiler: str | None = None
    # torch.compile the network. Off by default: `make bench` and `make gpu-check` measured the
    # compiled training steps of these networks no faster, on CPU or on an H200, after tens of
    # seconds of compiling
    compile: bool = False
    # capture each training step's forward and backward pass as a CUDA graph, replayed for
    # every batch of its shape (one graph per input size), the optimizer stepping after it as
    # one fused kernel: a small network's GPU step is bound by launching its kernels one by one
    # (make gpu-check). One GPU, 32-true or bf16-mixed precision, not compiled
    cuda_graph: bool = False
    # CPU threads of this training (torch's intra-op pool); null: torch's own choice (every
    # core, or OMP_NUM_THREADS). A search packing trials onto this machine sets each one's share
    threads: int | None = None
    # the one GPU (its index) this training uses; null: Lightning's choice. A search packing
    # trials onto this machine's GPUs sets each one's (hydra.sweeper.trials_per_device)
    device: int | None = None
    # seconds DDP ranks wait for each other (torch's process-group timeout): to meet when the
    # training starts (an address that does not resolve or answer, a rank that never started)
    # and at every synchronization after. A rank whose rank 0 never answers waits up to about
    # twice this: torch's store client makes a second attempt, after a random pause
    ddp_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        one_of(self.profiler, "trainer.profiler", ("simple", "advanced", "pytorch"), True)
        one_of(self.accelerator, "trainer.accelerator", ("cpu", "gpu", "cuda", "mps", "auto"))
        one_of(self.strategy, "trainer.strategy", ("auto", "ddp"))
        one_of(
            self.precision, "trainer.precision", ("32-true", "16-mixed", "bf16-mixed", "64-true")
        )
        require(self.devices >= 1, "trainer.devices", self.devices, "an integer >= 1")
        require(self.num_nodes >= 1, "trainer.num_nodes", self.num_nodes, "an integer >= 1")
        require(self.max_epochs >= 1, "trainer.max_epochs", self.max_epochs, "an integer >= 1")
        require(self.ddp_timeout_s > 0, "trainer.ddp_timeout_s", self.ddp_timeout_s, "seconds > 0")
        if self.threads is not None:
            require(self.threads >= 1, "trainer.threads", self.threads, "null or an integer >= 1")
        if self.device is not None:
            require(
                self.device >= 0 and self.devices == 1 and self.accelerator != "cpu",
                "trainer.device",
                self.device,
                "null, or a GPU index >= 0 with trainer.devices=1 on a GPU accelerator",
            )
        if self.cuda_graph:
            self.check_cuda_graph()
        if self.early_stopping_patience is not None:
            require(
                self.early_stopping_patience >= 1,
                "trainer.early_stopping_patience",
                self.early_stopping_patience,
                "null or an integer >= 1",
            )

    def check_cuda_graph(self) -> None:
        """trainer.cuda_graph=true where a captured step replays what the eager one does."""
        refused = [
            (
                self.accelerator not in ("gpu", "cuda"),
                f"trainer.accelerator={self.accelerator}: a CUDA graph replays GPU work",
            ),
            (
                self.strategy == "ddp" or self.world_size > 1,
                "DDP: its backward pass exchanges gradients between the ranks as it goes",
            ),
            (
                self.precision not in ("32-true", "bf16-mixed"),
                f"trainer.precision={self.precision}: its gradient scaler decides each step on "
                "the host",
            ),
            (self.compile, "trainer.compile=true: torch.compile makes graphs of its own"),
        ]
        reasons = [reason for bad, reason in refused if bad]
        require(
            not reasons,
            "trainer.cuda_graph",
            True,
            "true on one GPU with 32-true or bf16-mixed precision, not compiled; here: "
            + "; ".join(reasons),
        )

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def lightning_args(self) -> dict[str, Any]:
        """The keys that Lightning's Trainer takes, by the same names."""
        args = asdict(self)
        del args["early_stopping_patience"]  # a callback's setting
        del args["compile"]  # applied to the network (pipeline.training.fit)
        del args["cuda_graph"]  # the module's way of stepping (pipeline.training.module)
        del args["threads"]  # torch's setting (pipeline.training.fit)
        del args["ddp_timeout_s"]  # the DDP strategy's (pipeline.training.fit)
        if args.pop("device") is not None:
            args["devices"] = [self.device]
        return args


@dataclass
class OptimizerConfig:
    """`optimizer` group."""

    name: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw

    def __post_init__(self) -> None:
        one_of(self.name, "optimizer.name", ("sgd", "adam", "adamw"))
        require(0 < self.lr <= 10, "optimizer.lr", self.lr, "0 < lr <= 10")
        require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, ">= 0")
        require(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "0 <= m < 1")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            self.betas,
            "two values in [0, 1)",
        )


@dataclass
class SchedulerConfig:
    """`scheduler` group: the learning-rate schedule."""

    name: str = "none"
    step_size: int = 10  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    warmup_fraction: float = 0.25  # onecycle: share of steps spent rising to optimizer.lr

    def __post_init__(self) -> None:
        one_of(self.name, "scheduler.name", ("none", "step", "cosine", "onecycle"))
        require(self.step_size >= 1, "scheduler.step_size", self.step_size, ">= 1")
        require(0 < self.gamma <= 1, "scheduler.gamma", self.gamma, "0 < gamma <= 1")
        require(
            0 < self.warmup_fraction < 1,
            "scheduler.warmup_fraction",
            self.warmup_fraction,
            "0 < fraction < 1",
        )


@dataclass
class EvaluationConfig:
    """`evaluation`: the test-set evaluation, at the end of a training or on its own."""

    # test resolutions as multiples of the dataset's size (what GAP and SPP are for): the
    # multi-size training range (data.augment.scale_range) and beyond it on both sides
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3])
    # images per forward pass, for validation and testing too; larger batches outgrow a CPU's
    # caches and run slower there
    batch_size: int = 128

    def __post_init__(self) -> None:
        require(
            len(self.scales) > 0 and all(s > 0 for s in self.scales),
            "evaluation.scales",
            self.scales,
            "a non-empty list of positive multiples",
        )
        require(self.batch_size >= 1, "evaluation.batch_size", self.batch_size, "an integer >= 1")


# settings a resumed training can take anew (pipeline/training/resume.py): the optimizer's, the
# model's and the scheduler's live on in the checkpoint's state
CHANGEABLE_ON_RESUME = (
    "trainer.max_epochs",
    "data.batch_size",
    "data.augment.flip",
    "data.augment.max_shift",
    "data.augment.scale_range",
    "train.label_smoothing",
)


@dataclass
class RunOptions:
    """`train`: options of one training run."""

    label_smoothing: float = 0.0
    # output directory of an interrupted training: continue it, in the same MLflow run. Every
    # setting must be the checkpoint's, but where and how it runs (devices, threads, store...)
    resume: str | None = None
    # settings this resume changes on purpose (of CHANGEABLE_ON_RESUME), recorded in its run
    resume_changes: list[str] = field(default_factory=list)
    # evaluate the best checkpoint at the end (dvc.yaml: off, its evaluate stage does it)
    evaluate: bool = True

    def __post_init__(self) -> None:
        require(
            0 <= self.label_smoothing < 1,
            "train.label_smoothing",
            self.label_smoothing,
            "0 <= value < 1",
        )
        for key in self.resume_changes:
            one_of(key, "train.resume_changes", CHANGEABLE_ON_RESUME)


@dataclass
class SearchOptions:
    """`search`: set by the Optuna sweeper (pipeline/search/), never by hand."""

    # the study's trial this training is: it reports val/acc there every epoch and stops when
    # the pruner says so; null outside a search
    trial: int | None = None


@dataclass
class TrackingConfig:
    """`mlflow`: where runs are recorded."""

    tracking_uri: str = "${oc.env:MLFLOW_TRACKING_URI,sqlite:///mlruns/mlflow.db}"
    # one MLflow experiment per dataset by default
    experiment: str = "${dataset.name}"
    # the training's name: its run's, its logged model's, its figures' legend (DVC: the run's
    # key in params.yaml); null: a sweep trial is SWEEP-N, any other DATASET-BACKBONE_HEAD-ID
    run_name: str | None = None
    log_checkpoint: bool = True  # the best checkpoint as a run artifact
    # the best weights as an MLflow model (pyfunc: config and state dict), to register and serve
    log_model: bool = True
    # seconds a tracking server may take to answer before a training starts (it fails then,
    # naming the URI); once it started, MLflow's own retries ride out a short outage
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        require(0 < self.timeout_s <= 600, "mlflow.timeout_s", self.timeout_s, "0 < seconds <= 600")


@dataclass
class TrainJob:
    """`conf/config.yaml`: `python -m pipeline.train`."""

    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    trainer: TrainerConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    data: BatchConfig = field(default_factory=BatchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    train: RunOptions = field(default_factory=RunOptions)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    search: SearchOptions = field(default_factory=SearchOptions)
    seed: int = 0


# --- the other entry points ----------------------------------------------------------------


@dataclass
class EvaluateJob:
    """`conf/evaluate.yaml`: `python -m pipeline.evaluate run_dir=...`."""

    # a training's output directory
    run_dir: str = MISSING
    checkpoint: str = "checkpoints/best.ckpt"  # relative to run_dir
    out_dir: str | None = None  # null: RUN_DIR/eval
    # a Model Registry name: the training's MLflow model becomes a version of it, and its
    # @champion if no version scored a higher test accuracy (dvc.yaml: the run's name)
    register: str | None = None
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # seconds the training's tracking server may take to answer (as mlflow.timeout_s)
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        require(0 < self.timeout_s <= 600, "timeout_s", self.timeout_s, "0 < seconds <= 600")
        if self.register is not None:
            ok = re.fullmatch(r"[\w.-]+", self.register) is not None
            require(ok, "register", self.register, "null or a name of letters, digits, _ . -")


@dataclass
class SummaryJob:
    """`conf/summary.yaml`: a model and a dataset, with optional overrides of the input shape
    and class count (to show a network at its paper's size, e.g. AlexNet on ImageNet)."""

    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    input: list[int] | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.input is not None:
            ok = len(self.input) == 3 and self.input[0] in (1, 3) and min(self.input) > 0
            require(ok, "input", self.input, "null or [C, H, W] with C = 1 or 3")
        if self.num_classes is not None:
            require(self.num_classes >= 2, "num_classes", self.num_classes, "null or >= 2")

    def reported_dataset(self) -> DatasetConfig:
        """The dataset config with the overrides applied: what the model is built for."""
        dataset = self.dataset
        if self.input is not None:
            channels, height, width = self.input
            dataset = replace(dataset, channels=channels, height=height, width=width)
        if self.num_classes is not None:
            dataset = replace(dataset, classes=[str(i) for i in range(self.num_classes)])
        return dataset


@dataclass
class ServerJob:
    """`conf/server.yaml`: `python -m pipeline.server`, the team's MLflow tracking server."""

    host: str = "127.0.0.1"  # 0.0.0.0: reachable from other machines
    port: int = 5000
    # null: a PostgreSQL the project runs itself, its data in data_dir/postgres; or a team's own
    # database, e.g. postgresql://mlflow:PASSWORD@db.team:5432/mlflow
    backend_store_uri: str | None = None
    # the project-run database, the proxied artifacts, the database password file
    data_dir: str = ".server"
    database_port: int = 5433
    workers: int = 2  # uvicorn worker processes

    def __post_init__(self) -> None:
        for key in ("port", "database_port"):
            value = getattr(self, key)
            require(0 < value < 65536, key, value, "a TCP port, 1 to 65535")
        if self.backend_store_uri is not None:
            require(
                self.backend_store_uri.startswith("postgresql"),
                "backend_store_uri",
                mask_password(self.backend_store_uri),
                "null or a postgresql://user:password@host:port/database URI",
            )
        require(self.workers >= 1, "workers", self.workers, "an integer >= 1")


# --- the search: hydra/sweeper=optuna -------------------------------------------------------

OPTUNA_SWEEPER = "hydra_plugins.convnet_pipeline.optuna_sweeper.OptunaSweeper"


@dataclass
class OptunaSweeperConfig:
    """`hydra/sweeper=optuna` (pipeline/search/): an Optuna study behind Hydra's sweeper.

    The sampler and the pruner are config groups of `_target_` nodes in
    conf/hydra/sweeper/{sampler,pruner}/, instantiated by the sweeper (GridSampler takes the
    search space from `params`)."""

    _target_: str = OPTUNA_SWEEPER
    # the sampler and pruner stay configs until the sweeper builds them
    _recursive_: bool = False
    defaults: list[Any] = field(
        default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}, "_self_"]
    )
    sampler: Any = MISSING
    pruner: Any = MISSING
    direction: str = "maximize"
    # what each trial is scored by: a metric the training returns
    objective: str = "val/acc_best"
    # what each trial reports every epoch, for the pruner
    monitor: str = "val/acc"
    # null: EXPERIMENT-SEARCH (the mlflow experiment and the hparams_search preset), so that
    # running the same command again resumes the study
    study_name: str | None = None
    # where the study lives; null: sqlite beside a sqlite MLflow store (mlruns/optuna.db). A
    # tracking server needs a database every trial reaches: `make server` prints its
    # OPTUNA_STORAGE. Give a password through the environment, not on the command line
    storage: str | None = "${oc.env:OPTUNA_STORAGE,null}"
    # trials that end (finished, pruned or failed), in all, over every run of the command and
    # every process sharing the study
    n_trials: int = 20
    # trials asked for and run at once; null: trials_per_device x GPUs for GPU trainings on
    # this machine, else the launcher's parallelism (joblib's n_jobs; 1 for the basic one)
    n_jobs: int | None = None
    # trials sharing one GPU (each pinned to one: trainer.device); on CPU each trial run at
    # once gets its share of the cores (trainer.threads)
    trials_per_device: int = 1
    # the search stops, as failed, once more than this share of n_trials failed (a trial that
    # diverges or crashes fails; a pruned one does not)
    max_failure_rate: float = 0.5
    # seconds between a running trial's heartbeats; one silent for 4 of them has died (its
    # process was killed): it is failed and asked again
    heartbeat_s: int = 5
    # the search space: key -> choice(...), range(...), interval(...), tag(log, interval(...))
    # or a fixed value; sweeps on the command line join it
    params: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        one_of(self.direction, "hydra.sweeper.direction", ("maximize", "minimize"))
        for key in ("n_trials", "trials_per_device", "heartbeat_s"):
            value = getattr(self, key)
            require(value >= 1, f"hydra.sweeper.{key}", value, "an integer >= 1")
        if self.n_jobs is not None:
            require(self.n_jobs >= 1, "hydra.sweeper.n_jobs", self.n_jobs, "null or >= 1")
        require(
            0 <= self.max_failure_rate <= 1,
            "hydra.sweeper.max_failure_rate",
            self.max_failure_rate,
            "0 to 1",
        )


# Each primary config in conf/ starts from its schema: `defaults: [NAME_schema, _self_, ...]`.
store = ConfigStore.instance()
store.store(name="train_schema", node=TrainJob)
store.store(name="evaluate_schema", node=EvaluateJob)
store.store(name="summary_schema", node=SummaryJob)
store.store(name="prepare_schema", node=PrepareJob)
store.store(name="server_schema", node=ServerJob)
store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConfig)
