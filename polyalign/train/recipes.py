"""Recipes: YAML -> typed config -> model, data, trainer -> train -> checkpoint.

A recipe has ``method`` (msd | mlc), ``model``, ``output_dir``, ``data``, the method's section,
``lora`` (omit or null for full fine-tuning) and ``training`` (any ``TrainingArguments`` field).
An ``msd`` recipe may also have an ``mlc`` section: MSD + MLC in one objective (:func:`msd_mlc_config`).
``key=value`` overrides use dots for nesting (``msd.mode=off_policy``); a bare key that is not a
top-level field is looked up in ``training`` (``max_steps=30``). Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from polyalign.data.builtin import load_prompts
from polyalign.data.records import atomic_write_text
from polyalign.errors import PolyalignError
from polyalign.models.adapters import LoraSettings
from polyalign.train.msd_config import MSDConfig


@dataclass
class DataSettings:
    """Where prompts come from. ``builtin:harmful`` / ``builtin:benign`` are the package's own
    benchmark (train split); any other value is a path the data layer reads.

    ``limit`` draws a stratified sample seeded by the recipe's ``seed``: the same number of prompts
    from every category (as far as each has them), not the first N rows. Loaders return records
    grouped by category, so ``records[:400]`` of XSafety was three categories out of fourteen.
    """

    source: str = "builtin:harmful"
    format: str | None = None
    split: str = "train"             # hash split by prompt id (never leaks into dev/test)
    limit: int | None = None         # N prompts, stratified over categories, seeded
    category: list[str] | None = None  # keep only these record categories (None = all), before ``limit``
    benign_source: str | None = None  # benign prompts mixed in so the model keeps answering them
    benign_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("limit", "benign_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of prompts (or null for all), got {value}")


@dataclass
class Recipe:
    """``trust_remote_code`` (off unless asked for), ``revision`` and ``attn_implementation`` go to the
    model's and tokenizer's ``from_pretrained``."""

    method: str
    model: str
    output_dir: str
    seed: int = 0
    dtype: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str | None = None
    data: DataSettings = field(default_factory=DataSettings)
    msd: dict[str, Any] | None = None
    mlc: dict[str, Any] | None = None
    lora: dict[str, Any] | None = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for i, k in enumerate(keys[:-1]):
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            where = ".".join(keys[:i + 1])
            raise PolyalignError(f"override {dotted}: {where} is {'null' if d is None else repr(d)} in this recipe, "
                                 f"so it has no keys to set; give the whole section, e.g. {where}={{...}}")
    d[keys[-1]] = value


_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _numbers(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; every reader of a recipe means a float."""
    if isinstance(value, str) and _YAML11_FLOAT.match(value):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    top = {f.name for f in dataclasses.fields(Recipe)}
    for item in overrides:
        if "=" not in item:
            raise PolyalignError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        if key.split(".")[0] not in top:
            key = f"training.{key}"
        _set(raw, key, yaml.safe_load(value))
    return raw


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", dict: "a mapping",
          list: "a list", type(None): "null"}


def _accepts(tp: Any, value: Any) -> bool | None:
    """Whether ``value`` (as YAML read it) fits the annotation ``tp``; None where the type is not one
    of the plain ones checked here (enums, classes): the class's own checks decide."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(a, value) for a in args]
        return True if True in verdicts else None if None in verdicts else False
    if tp is Any:
        return True
    if tp is bool or tp is type(None) or tp is str:
        return value is None if tp is type(None) else isinstance(value, tp)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is list or origin is list:
        return isinstance(value, list) and (not args or all(_accepts(args[0], v) is not False for v in value))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return None


def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if typing.get_origin(tp) is list and args:
        return f"a list of {_describe(args[0]).removeprefix('a ')}"
    return _KINDS.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


def check_types(cls: type, values: dict[str, Any], where: str, counts: bool = True) -> None:
    """Each value against its field's annotation in ``cls``: ``msd.benign_weight=abc`` is "msd:
    benign_weight must be a number, got 'abc'", not a comparison error from deep inside.
    ``counts``: a whole-number field whose default is positive (top_k, max_new_tokens, r, dim, ...)
    counts something and must be >= 1."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in values.items():
        tp = hints.get(key)
        if tp is not None and _accepts(tp, value) is False:
            raise PolyalignError(f"{where}: {key} must be {_describe(tp)}, got {value!r}")
        default = defaults.get(key)
        if counts and type(default) is int and default > 0 and type(value) is int and value < 1:
            raise PolyalignError(f"{where}: {key} must be a positive number, got {value}")


# TrainingArguments fields whose values cannot be negative (or zero where the bound is 1) ...
_TRAINING_MIN = {"learning_rate": 0, "weight_decay": 0, "warmup_steps": 0, "max_grad_norm": 0, "seed": 0,
                 "data_seed": 0, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                 "num_train_epochs": 0, "dataloader_num_workers": 0, "save_total_limit": 1}
_TRAINING_POSITIVE = ("logging_steps", "save_steps")       # ... and those that must be above zero


def check_training(values: dict[str, Any], where: str) -> None:
    """``training`` values against TrainingArguments' annotations and the bounds above: TrainingArguments
    takes ``learning_rate: -1`` and the optimizer fails on it mid-setup with a traceback."""
    from transformers import TrainingArguments

    check_types(TrainingArguments, values, f"{where}: training", counts=False)
    for key, value in values.items():
        if key in _TRAINING_MIN and value is not None and value < _TRAINING_MIN[key]:
            raise PolyalignError(f"{where}: training: {key} must be >= {_TRAINING_MIN[key]}, got {value}")
        if key in _TRAINING_POSITIVE and value is not None and value <= 0:
            raise PolyalignError(f"{where}: training: {key} must be > 0, got {value}")
    steps = values.get("max_steps")
    if steps is not None and steps != -1 and steps < 1:
        raise PolyalignError(f"{where}: training: max_steps must be >= 1 (or -1: use num_train_epochs), got {steps}")


def _strict(cls: type, values: Any, where: str) -> Any:
    """``cls(**values)`` for a config dataclass: unknown keys, a non-mapping, values of the wrong
    type (:func:`check_types`) and values the class rejects are one-line errors naming ``where``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise PolyalignError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise PolyalignError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    check_types(cls, values, where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise PolyalignError(f"{where}: {e}") from None


def shipped_recipes() -> list[str]:
    """Names of the recipes inside the package (``polyalign/recipes/*.yaml``)."""
    return sorted(p.name[:-5] for p in resources.files("polyalign").joinpath("recipes").iterdir()
                  if p.name.endswith(".yaml"))


def resolve_recipe(spec: str | Path) -> Path:
    """A YAML path, or the name of a shipped recipe (``msd_onpolicy``), which works from a wheel too."""
    path = Path(spec)
    if path.exists():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if name in shipped_recipes() and (len(path.parts) == 1 or path.parent.name == "recipes"):
        return Path(str(resources.files("polyalign").joinpath("recipes", f"{name}.yaml")))
    raise PolyalignError(f"{spec}: recipe not found (a YAML path, or one of: {', '.join(shipped_recipes())})")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = resolve_recipe(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PolyalignError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise PolyalignError(f"{path}: expected a mapping of recipe keys, got {type(raw).__name__}")
    raw = _numbers(apply_overrides(raw, overrides or []))
    recipe = _strict(Recipe, raw, str(path))
    recipe.data = _strict(DataSettings, raw.get("data"), f"{path}: data")
    validate_recipe(recipe, str(path))
    return recipe


def validate_recipe(r: Recipe, where: str) -> None:
    """Bind every section to its config class without loading a model (CI checks all recipes)."""
    from transformers import TrainingArguments

    from polyalign.models.loading import resolve_dtype

    if r.method not in ("msd", "mlc"):
        raise PolyalignError(f"{where}: method must be msd or mlc, got {r.method!r}")
    if r.seed < 0:
        raise PolyalignError(f"{where}: seed must be >= 0, got {r.seed}")
    if r.dtype is not None:
        resolve_dtype(r.dtype)                      # an unknown dtype: one line, before any model loads
    if r.method == "msd":
        msd = _strict(MSDConfig, r.msd, f"{where}: msd")
        msd_mlc_config(r.mlc, msd, where)
    else:
        from polyalign.train.mlc_config import MLCConfig

        _strict(MLCConfig, r.mlc, f"{where}: mlc")
    if r.lora is not None:
        lora = _strict(LoraSettings, r.lora, f"{where}: lora")
        if not 0 <= lora.dropout < 1:
            raise PolyalignError(f"{where}: lora: dropout must be in [0, 1), got {lora.dropout}")
    if not isinstance(r.training, dict):
        raise PolyalignError(f"{where}: training: expected a mapping, got {type(r.training).__name__}")
    allowed = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(r.training) - allowed)
    if unknown:
        raise PolyalignError(f"{where}: training: unknown TrainingArguments field(s) {', '.join(unknown)}")
    check_training(r.training, where)


MSD_MLC_KEYS = ("weight", "every", "tau", "layer", "projection", "dim")


def msd_mlc_config(values: dict[str, Any] | None, msd: MSDConfig, where: str = "recipe") -> Any:
    """An ``msd`` recipe's ``mlc`` section -> MLCConfig (None without one): the MLC term over the batch's
    prompts in the teacher language and every student language. Only the term's own settings
    (:data:`MSD_MLC_KEYS`) are allowed: the alignment loss is MSD and the languages are MSD's."""
    if not values:
        return None
    from polyalign.train.mlc_config import MLCConfig

    unused = sorted(set(values) - set(MSD_MLC_KEYS))
    if unused:
        raise PolyalignError(f"{where}: mlc: {', '.join(unused)} not used with method msd; allowed: "
                             f"{', '.join(MSD_MLC_KEYS)}")
    return _strict(MLCConfig, {**values, "languages": [msd.teacher_language, *msd.student_languages]}, f"{where}: mlc")


def precision(r: Recipe) -> tuple[str, bool]:
    """(dtype the weights load in, whether Trainer autocasts to bf16) for a recipe.

    LoRA: the frozen base loads in the policy dtype (bf16 where fast) and the adapter with its
    optimizer state stays fp32 (PEFT upcasts adapter weights), so no autocast is needed. Full
    fine-tuning: the usual mixed precision, fp32 master weights and optimizer state with bf16
    autocast, since AdamW updates on bf16 weights lose most small steps to rounding.
    """
    from polyalign.models.loading import resolve_dtype

    dtype = resolve_dtype(r.dtype)
    if r.lora is None and dtype == "bfloat16":
        return "float32", True
    return dtype, False


def training_arguments(r: Recipe, resume_dir: str | None = None):
    """TrainingArguments with polyalign's defaults for a recipe (the recipe's values win)."""
    import torch
    from transformers import TrainingArguments

    _, autocast_bf16 = precision(r)
    defaults: dict[str, Any] = {"output_dir": r.output_dir, "report_to": "none", "logging_steps": 1,
                                "save_strategy": "steps", "save_steps": 10, "save_total_limit": 2,
                                "seed": r.seed, "data_seed": r.seed, "per_device_train_batch_size": 4,
                                "learning_rate": 2e-5, "max_steps": 10, "lr_scheduler_type": "constant",
                                "use_cpu": not torch.cuda.is_available(), "bf16": autocast_bf16,
                                "dataloader_num_workers": 0, "disable_tqdm": False}
    try:
        return TrainingArguments(**{**defaults, **r.training})
    except (TypeError, ValueError) as e:      # e.g. lr_scheduler_type: foo; TrainingArguments' own checks
        raise PolyalignError(f"training: {str(e).strip().splitlines()[0]}") from None


def model_options(r: Recipe) -> dict[str, Any]:
    """The recipe's ``from_pretrained`` options for :func:`polyalign.models.load_model`."""
    return {"trust_remote_code": r.trust_remote_code, "revision": r.revision,
            "attn_implementation": r.attn_implementation}


def training_device(args: Any) -> str:
    """Where this rank loads its weights: its own device (``args.device``, ``cuda:<local rank>`` under a
    launcher), or the CPU where the engine places them itself: ZeRO-3 loads through ``zero.Init`` and
    FSDP's ``cpu_ram_efficient_loading`` loads on local rank 0 only (both refuse a ``device_map``).

    Reading ``args.device`` sets up accelerate's ``PartialState`` (the process group and each rank's
    CUDA device): it must come before the model loads, as must TrainingArguments themselves, which
    register the DeepSpeed config that ``from_pretrained`` reads to load under ``zero.Init``."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_enabled

    device = args.device
    if is_deepspeed_zero3_enabled() or is_fsdp_enabled() or device.type == "cpu":
        return "cpu"
    return str(device)


def build_model(r: Recipe, device: str | None = None, base: Any = None):
    """The recipe's policy and tokenizer, seeded by the recipe first (the adapter's init is random),
    so a model built here and passed to :func:`run_recipe` (the demo does) trains exactly as one
    ``run_recipe`` builds itself, whatever ran before (an evaluation, another model). ``device``:
    :func:`training_device` (default: this rank's GPU, else the CPU). ``base``: the recipe's model
    already loaded in the recipe's dtype and never written (the demo's, after its baseline
    evaluation), used instead of loading it again (loading draws no random numbers, so the adapter's
    init is the same either way: tests/test_recipes.py)."""
    from transformers import set_seed

    from polyalign.models import attach_lora, load_model, load_tokenizer
    from polyalign.models.loading import model_dtype

    set_seed(r.seed)
    tok = load_tokenizer(r.model, trust_remote_code=r.trust_remote_code, revision=r.revision)
    if base is not None and model_dtype(base) != precision(r)[0]:
        raise ValueError(f"build_model: the base passed is in {model_dtype(base)}, the recipe trains on "
                         f"{precision(r)[0]}")
    model = base if base is not None else load_model(r.model, dtype=precision(r)[0], device=device, **model_options(r))
    model.train()
    if r.lora is not None:
        model = attach_lora(model, LoraSettings(**r.lora))
    return model, tok


def reference_model(r: Recipe, device: str | None = None):
    """Full fine-tuning's frozen teacher: the initial weights loaded a second time through the same
    path (so ``zero.Init`` shards it like the policy), in the recipe's dtype (bf16 where fast): it only
    runs forwards, so it needs none of the policy's fp32 master weights."""
    from polyalign.models import load_model
    from polyalign.models.loading import resolve_dtype

    return load_model(r.model, dtype=resolve_dtype(r.dtype), device=device, **model_options(r)).requires_grad_(False)


def run_recipe(r: Recipe, resume: bool = False, model: Any = None, tokenizer: Any = None) -> Path:
    """Train and save ``output_dir/final`` (adapter or model, heads, tokenizer, recipe)."""
    from transformers import set_seed

    set_seed(r.seed)
    args = training_arguments(r)                   # before any weights load: see training_device
    device = training_device(args)
    if model is None:
        model, tokenizer = build_model(r, device)
    records = load_prompts(r.data.source, r.data.format, r.data.split, r.data.limit, r.data.category, r.seed)
    if r.data.benign_source:
        records = records + load_prompts(r.data.benign_source, None, r.data.split, r.data.benign_limit, seed=r.seed)
    heads: dict[str, Any] = {}
    if r.method == "msd":
        from polyalign.train.msd_trainer import MSDTrainer, build_msd_examples

        cfg = MSDConfig(**(r.msd or {}))
        examples = build_msd_examples(records, cfg)
        if not examples:
            raise PolyalignError(f"no (student, {cfg.teacher_language}) prompt pairs in {r.data.source} for "
                                 f"student languages {cfg.student_languages}")
        ref = reference_model(r, device) if r.lora is None else None
        trainer = MSDTrainer(model, args, cfg, examples, tokenizer, ref_model=ref, mlc_config=msd_mlc_config(r.mlc, cfg))
        if trainer.mlc_term is not None:
            heads = {"mlc_head": trainer.mlc_term.head}
    else:
        from polyalign.train.mlc_trainer import build_mlc_trainer

        trainer = build_mlc_trainer(r, model, tokenizer, records, args, device)
        heads = {"mlc_head": trainer.mlc_head}
    last = _last_checkpoint(r.output_dir) if resume else None
    if resume and last is None:
        raise PolyalignError(f"--resume: no checkpoint-* folder in {r.output_dir}")
    if last is not None and 0 < args.max_steps <= int(last.name.split("-")[-1]):
        _load_finished(trainer, last, heads)
    else:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    final = Path(r.output_dir) / "final"
    # the method's settings as trained, defaults included (msd.draw, ...), not only what the YAML spelled out
    resolved = {k: dataclasses.asdict(v) for k in ("msd", "mlc")
                if dataclasses.is_dataclass(v := getattr(trainer, k, None))}
    save_final(trainer, final, heads, {"recipe": dataclasses.asdict(r), "resolved": resolved,
                                       "bf16_autocast": bool(args.bf16)})
    # one writer, atomically: with several processes each wrote the file at once and a reader could
    # see two histories run together (tests/test_distributed.py failed on it once in CI)
    if trainer.accelerator.is_main_process:
        atomic_write_text(final / "log_history.json", json.dumps(trainer.state.log_history, indent=1))
    return final


def save_final(trainer: Any, final: Path, heads: dict[str, Any], info: dict[str, Any]) -> None:
    """``final/``: the weights through ``trainer.save_model`` on every rank (under ZeRO-3 and FSDP it
    gathers the shards with ``accelerator.get_state_dict``; the main process writes: adapter or model,
    tokenizer), the extra heads gathered the same way (:func:`gathered_state`), and provenance.
    ``save_pretrained`` on the unwrapped model wrote each rank's empty shards instead."""
    from safetensors.torch import save_file

    from polyalign.models.adapters import CHECKPOINT_INFO, EXTRA_HEADS_FILE, is_peft
    from polyalign.models.loading import model_dtype
    from polyalign.train.mlc_term import gathered_state

    trainer.save_model(str(final))
    states = {name: gathered_state(head, trainer.accelerator, trainer.model_wrapped) for name, head in heads.items()}
    if not trainer.accelerator.is_main_process:
        return
    tensors = {f"{name}.{k}": v for name, state in states.items() for k, v in state.items()}
    if tensors:
        save_file(tensors, str(final / EXTRA_HEADS_FILE))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    base = policy.get_base_model() if is_peft(policy) else policy
    provenance = {"base_model": getattr(base.config, "polyalign_spec", None), "adapter": is_peft(policy),
                  "dtype": model_dtype(policy), **info}
    atomic_write_text(final / CHECKPOINT_INFO, json.dumps(provenance, indent=1, default=str))


def _load_finished(trainer: Any, ckpt: Path, heads: dict[str, Any]) -> None:
    """A run stopped after saving its last step's checkpoint but before ``final/``: load that
    checkpoint as it is. (Trainer, resumed there, would take one step past ``max_steps``.)"""
    from transformers import TrainerState

    from polyalign.train.mlc_term import load_head

    trainer._load_from_checkpoint(str(ckpt))
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    for head in heads.values():
        load_head(head, ckpt)


def _last_checkpoint(output_dir: str) -> Path | None:
    ckpts = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return ckpts[-1] if ckpts else None
