"""`TrainConfig`: everything a training run needs, saved with the run and in every checkpoint.

The run's common settings are fields (model, data, the loop's steps and learning rate, distillation,
evaluation cadence, device); the method's own settings are `options`, validated by the method's
`Options` dataclass (`pruning.methods`). `TrainConfig.build(**flat)` takes both kinds as keywords and
sorts them, which is what the CLI, the Prune page and tests use:

    TrainConfig.build(method="cofi", target_sparsity=0.5, steps=100)
    TrainConfig(method="cofi", steps=100, options={"target_sparsity": 0.5})      # the same
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from core.data import DataSpec, format_label_map, parse_label_map
from pruning import methods as registry
from pruning.distributed import DEVICES
from pruning.lora import LoraSettings
from pruning.options import check_fields, option

TASKS = ("", "classify", "lm")  # the data's task ("": as the data implies, `core.data.DataSpec.task`)


@dataclass
class TrainConfig:
    """Common settings of a run plus the method's `options` (a dict, see the module docstring).

    Defaults run CoFi on the default model (MiniLM-L6, Rotten Tomatoes) in a few minutes on 2 CPU cores.
    """

    model: str = option("default", "default | minilm-l3 | smollm2 | folder of a fine-tuned classifier or a "
                        "Llama-family decoder (also the teacher)", required=True)
    teacher: str = option("", "distillation teacher and latency reference (blank: the model itself); same labels")
    data: str = option("default", "default (Rotten Tomatoes) | lm (Lee news) | wiki (Wikipedia) | CSV/TSV/JSONL "
                       "file of labelled rows or TXT/JSONL file of documents, split 80/10/10 (seeded)", required=True)
    task: str = option("", "what the data trains: classify (labelled rows; a decoder's prompt) | lm (documents: a "
                       "decoder's next-token loss); blank: lm for the built-in text, else classify", choices=TASKS)
    text_column: str = option("", "data file: the column holding the texts (blank: auto-detected, 'text' first)")
    label_column: str = option("", "data file: the column holding the labels (blank: auto-detected, 'label' first)")
    label_map: dict = field(default_factory=dict, metadata={
        "help": "the data's labels as the model's, FILE=MODEL pairs, e.g. pos=fresh,neg=rotten (blank: by name)",
        "parse": parse_label_map, "format": format_label_map})
    method: str = option("cofi", "the pruning method (see `python -m pruning methods`)")
    steps: int = option(400, "learned methods: optimizer steps learning gates and weights (incl. a plain "
                        "fine-tune)", low=0)
    finetune_steps: int = option(150, "steps fine-tuning the sliced model after pruning (0: none)", low=0)
    lr: float = option(5e-5, "AdamW learning rate of the model weights, or of the LoRA adapters with lora "
                       "(linear decay in the final fine-tune)", low=0.0, open_low=True)
    batch_size: int = option(32, "training examples per step", low=1)
    max_length: int = option(64, "tokens per training example (longer ones are cut; a decoder's prompt template "
                             "comes on top of the text's)", low=8, high=512)
    lora: bool = option(False, "train LoRA adapters on Q/K/V/O and the FFN projections instead of the weights "
                        "(base weights frozen; merged before pruning and export)")
    lora_rank: int = option(8, "lora: rank r of each adapter", low=1, high=256)
    lora_alpha: float = option(16.0, "lora: scale numerator alpha (the delta is scaled by alpha / r)", low=0.0,
                               open_low=True)
    lora_dropout: float = option(0.0, "lora: dropout probability on each adapter's input (0: none, the fastest "
                                 "on a CPU)", low=0.0, high=1.0, open_high=True)
    distill: bool = option(True, "mix logit distillation from the dense teacher into the task loss")
    alpha_ce: float = option(0.5, "weight of the logit distillation T^2 KL (CoFi: 0.1, 0.3 or 0.5)", low=0.0,
                             high=1.0)
    temperature: float = option(2.0, "distillation temperature T", low=0.0, open_low=True)
    eval_every: int = option(25, "fewest steps between eval steps (more when evals would exceed eval_budget)",
                             low=1)
    eval_budget: float = option(0.2, "largest fraction of the wall time spent on live metrics", low=0.0,
                                high=1.0, open_low=True)
    eval_examples: int = option(200, "dev examples (seeded subset) at each eval step; the last eval uses all",
                                low=1)
    drift_examples: int = option(16, "the eval subset's first texts whose LRP explanations are compared with the "
                                 "dense model's at each eval step (explanation drift, classification on the CPU; "
                                 "0: off)", low=0)
    checkpoint_every: int = option(2, "eval steps between checkpoints", low=0)
    seed: int = option(0, "seed of batches, gate noise, dropout and baseline draws", low=0)
    threads: int = option(1, "torch threads (1 keeps the app responsive on 2 cores; 0 = torch's default)", low=0)
    device: str = option("auto", "auto (CUDA when present) | cpu | cuda; bf16 autocast on CUDA", choices=DEVICES)
    tensorboard: str = option("", "also write TensorBoard event files to this folder (one subfolder per run; blank: "
                              "none); open with `tensorboard --logdir DIR`")
    mlflow: str = option("", "also log the run to an MLflow file store in this folder (experiment 'headlab'; "
                         "blank: none); open with `mlflow ui --backend-store-uri DIR`")
    options: dict = field(default_factory=dict, metadata={"help": "the method's own settings"})

    @classmethod
    def common_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "options"]

    @classmethod
    def build(cls, **values) -> TrainConfig:
        """A config from flat keywords: common fields as they are (one with a text form, like label_map, also
        as that text: "pos=fresh,neg=rotten"), the rest as the method's options."""
        common = set(cls.common_fields())
        parsers = {f.name: f.metadata["parse"] for f in fields(cls) if "parse" in f.metadata}
        values = {k: parsers[k](v) if k in parsers and isinstance(v, str) else v for k, v in values.items()}
        options = {**values.pop("options", {}), **{k: v for k, v in values.items() if k not in common}}
        return cls(**{k: v for k, v in values.items() if k in common}, options=options)

    def method_class(self) -> type[registry.PruningMethod]:
        return registry.get(self.method)

    def method_options(self):
        """The method's `Options` instance (defaults filled in, validated)."""
        return registry.check_options(self.method_class(), self.options)

    def check(self) -> TrainConfig:
        """Validate every field and option once (ValueError naming the field, the rule and the value)."""
        check_fields(self, "TrainConfig")
        cls = self.method_class()
        for name in ("text_column", "label_column"):
            if getattr(self, name).strip() and self.data.strip().lower() == "default":
                raise ValueError(f"The '{name}' parameter of TrainConfig must be blank for data 'default' (its "
                                 f"columns are fixed). Got {getattr(self, name)!r} instead.")
        _ = self.data_spec  # DataError (a ValueError) for a label map that is not {file label: model label}
        if cls.learned and self.steps < 1:
            raise ValueError(f"The 'steps' parameter of TrainConfig must be at least 1 for method {self.method}. "
                             f"Got {self.steps!r} instead.")
        cls.check_config(self.method_options(), self)
        return self

    @property
    def teacher_spec(self) -> str:
        """The teacher's model spec: `teacher`, or `model` when blank."""
        return self.teacher.strip() or self.model

    @property
    def data_spec(self) -> DataSpec:
        """The run's data as one `DataSpec` (always split 80/10/10: a run trains on train, evaluates on dev)."""
        return DataSpec(self.data, self.text_column, self.label_column, self.label_map, task=self.task or None)

    @staticmethod
    def data_fields(spec: DataSpec) -> dict:
        """The fields (as `build` keywords) that give a run the data of `spec`. ValueError for a whole-file
        spec: a run needs the file's train split."""
        if spec.whole_file:
            raise ValueError(f"A training run splits {spec.path} 80/10/10 (train / dev / test); 'whole file' "
                             "applies to evaluation only.")
        return {"data": spec.path, "text_column": spec.text_column or "", "label_column": spec.label_column or "",
                "label_map": dict(spec.label_map), "task": spec.task if spec.is_text and not spec.is_builtin else ""}

    @property
    def lora_settings(self) -> LoraSettings | None:
        """The LoRA adapters' settings (None: the weights themselves train)."""
        return LoraSettings(self.lora_rank, self.lora_alpha, self.lora_dropout) if self.lora else None

    @property
    def gate_steps(self) -> int:
        """Steps of the gate phase (0 for one-shot methods)."""
        return self.steps if self.method_class().learned else 0

    @property
    def total_steps(self) -> int:
        return self.gate_steps + self.finetune_steps

    def setting(self, name: str):
        """A common field or the method's option `name` (with its default), e.g. for tables."""
        if name in self.common_fields():
            return getattr(self, name)
        return getattr(self.method_options(), name, None)

    def to_dict(self) -> dict:
        return asdict(self)

    def cli_args(self) -> list[str]:
        """The `python -m pruning train` options that set this config (values left at their default are
        omitted), e.g. ["--method", "l0", "--steps", "100", "--no-distill", "--l0-lambda", "0.05"]."""
        values = [(f, getattr(self, f.name)) for f in fields(self) if f.name != "options"]
        values += [(f, getattr(self.method_options(), f.name)) for f in fields(self.method_class().Options)]
        args = []
        for f, value in values:
            if value == (f.default_factory() if f.default_factory is not MISSING else f.default):
                continue
            flag = "--" + f.name.replace("_", "-")
            text = f.metadata.get("format", str)(value)
            args += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, text]
        return args

    @classmethod
    def target_of(cls, data: dict) -> float | None:
        """The target sparsity of a stored run's config (None: the method has none, or the config is not
        readable any more)."""
        try:
            return cls.from_dict(data).setting("target_sparsity")
        except ValueError:
            return None

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of `to_dict`, validated. A flat dict (options at the top level, as runs recorded before
        methods had their own options) is read too; an unknown name is refused as an unknown option of the
        method (ValueError)."""
        if not isinstance(data, dict):
            raise ValueError(f"A training config must be a JSON object. Got {type(data).__name__}.")
        return cls.build(**data).check()
