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


@dataclass
class Recipe:
    method: str
    model: str
    output_dir: str
    seed: int = 0
    dtype: str | None = None
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


def _strict(cls: type, values: Any, where: str) -> Any:
    """``cls(**values)`` for a config dataclass: unknown keys, a non-mapping and bad values are
    one-line errors naming ``where``."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise PolyalignError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise PolyalignError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
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
    raw = _numbers(apply_overrides(raw, overrides or []))
    recipe = _strict(Recipe, raw, str(path))
    recipe.data = _strict(DataSettings, raw.get("data"), f"{path}: data")
    validate_recipe(recipe, str(path))
    return recipe


def validate_recipe(r: Recipe, where: str) -> None:
    """Bind every section to its config class without loading a model (CI checks all recipes)."""
    from transformers import TrainingArguments

    if r.method not in ("msd", "mlc"):
        raise PolyalignError(f"{where}: method must be msd or mlc, got {r.method!r}")
    if r.method == "msd":
        msd = _strict(MSDConfig, r.msd, f"{where}: msd")
        msd_mlc_config(r.mlc, msd, where)
    else:
        from polyalign.train.mlc_config import MLCConfig

        _strict(MLCConfig, r.mlc, f"{where}: mlc")
    if r.lora is not None:
        _strict(LoraSettings, r.lora, f"{where}: lora")
    allowed = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(r.training) - allowed)
    if unknown:
        raise PolyalignError(f"{where}: training: unknown TrainingArguments field(s) {', '.join(unknown)}")


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
    return TrainingArguments(**{**defaults, **r.training})


def build_model(r: Recipe):
    """The recipe's policy and tokenizer, seeded by the recipe first (the adapter's init is random),
    so a model built here and passed to :func:`run_recipe` (the demo does) trains exactly as one
    ``run_recipe`` builds itself, whatever ran before (an evaluation, another model)."""
    from transformers import set_seed

    from polyalign.models import attach_lora, load_model, load_tokenizer

    set_seed(r.seed)
    tok = load_tokenizer(r.model)
    model = load_model(r.model, dtype=precision(r)[0])
    model.train()
    if r.lora is not None:
        model = attach_lora(model, LoraSettings(**r.lora))
    return model, tok


def run_recipe(r: Recipe, resume: bool = False, model: Any = None, tokenizer: Any = None) -> Path:
    """Train and save ``output_dir/final`` (adapter or model, heads, tokenizer, recipe)."""
    from transformers import set_seed

    from polyalign.models.adapters import save_checkpoint

    set_seed(r.seed)
    if model is None:
        model, tokenizer = build_model(r)
    args = training_arguments(r)
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
        trainer = MSDTrainer(model, args, cfg, examples, tokenizer, mlc_config=msd_mlc_config(r.mlc, cfg))
        if trainer.mlc_term is not None:
            heads = {"mlc_head": trainer.mlc_term.head}
    else:
        from polyalign.train.mlc_trainer import build_mlc_trainer

        trainer = build_mlc_trainer(r, model, tokenizer, records, args)
        heads = {"mlc_head": trainer.mlc_head}
    last = _last_checkpoint(r.output_dir) if resume else None
    if resume and last is None:
        raise PolyalignError(f"--resume: no checkpoint-* folder in {r.output_dir}")
    if last is not None and 0 < args.max_steps <= int(last.name.split("-")[-1]):
        _load_finished(trainer, last, heads)
    else:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    final = Path(r.output_dir) / "final"
    from polyalign.models.loading import model_dtype

    policy = trainer.accelerator.unwrap_model(trainer.model)
    save_checkpoint(policy, final, tokenizer, heads=heads,
                    info={"recipe": dataclasses.asdict(r), "dtype": model_dtype(policy),
                          "bf16_autocast": bool(args.bf16)})
    # one writer, atomically: with several processes each wrote the file at once and a reader could
    # see two histories run together (tests/test_distributed.py failed on it once in CI)
    if trainer.accelerator.is_main_process:
        atomic_write_text(final / "log_history.json", json.dumps(trainer.state.log_history, indent=1))
    return final


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
