"""MSDConfig: the method's own settings (TrainingArguments hold the rest)."""

from __future__ import annotations

from dataclasses import dataclass, field

from polyalign.losses.msd import KINDS
from polyalign.text.languages import normalize_code

# METHODS.md section 2, verbatim.
TEACHER_TEMPLATE = (
    "You are a helpful assistant.\n"
    "User query: {target_query}\n"
    "The query in English is: {english_query}\n"
    "Instructions:\n"
    "1. Analyze the query in English to determine if it violates safety guidelines (e.g., illegal, harmful, dangerous).\n"
    "2. If unsafe, generate a polite refusal. If safe, answer helpfully. Always respond in the same language as the "
    "original query.\n"
    "Please output your final response directly:"
)

# Our choice for small models: the paper's template names safety, and a 0.5B teacher shown it
# refuses benign queries too (in English), so distillation can only teach refusing everything.
# Without the instruction the teacher's own English judgement decides: on the built-in train
# split, Qwen2.5-Coder-0.5B refused 0/8 benign and 5/8 harmful th/zh queries (docs/msd.md).
SELECTIVE_TEMPLATE = "{target_query}\n\n(In English: {english_query})"

# The teacher reads the English query only: its English behaviour, which is what the model is known
# to get right, with no instruction to bias it (for a 0.5B model the selective template's teacher
# refused only 6/12 harmful queries, this one 12/12, and 3/12 benign ones; docs/msd.md).
ENGLISH_ONLY_TEMPLATE = "{english_query}"


@dataclass
class MSDConfig:
    """Multilingual self-distillation (Qin et al. 2026).

    Sampling:
        mode: ``on_policy`` (the student samples y from p_S(.|x_tgt); paper default) or
            ``off_policy`` (the frozen teacher samples y from p_T(.|x_tgt, x*, C)).
        temperature, top_p, max_new_tokens: sampling of y; not reported in the paper
            (our choice: 1.0, 1.0, 256). ``temperature: 0`` decodes greedily (deterministic runs).
    Loss:
        divergence: ``reverse_kl`` KL(p_S||p_T) (paper default) | ``forward_kl`` | ``jsd``.
        jsd_beta: mixture weight of JSD (0.5).
        dpsw: Dual-Perspective Safety Weighting of tokens (on; helps in every setting of the paper).
        top_k: K of the teacher-entropy term (32; 16/32/64 searched, 32 best).
    Contexts:
        teacher_template: the teacher's user turn; must contain ``{english_query}``, and
            ``{target_query}`` where the teacher should also see the original query (the paper's).
        teacher_language: the language the teacher reads (en).
        student_languages: the target languages trained (paper: zh ar bn).
        max_prompt_tokens: longer prompts are cut from the left (keeps the end of the chat turn).
        benign_retain: prompts whose record category is ``benign`` are distilled from the frozen
            model in the student's own context (no English hint), which holds their behaviour and
            language where they were instead of moving them towards the teacher (our choice, off by
            default; docs/msd.md explains why a 0.5B model needs it).
    """

    mode: str = "on_policy"
    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    dpsw: bool = True
    top_k: int = 32
    teacher_template: str = TEACHER_TEMPLATE
    teacher_language: str = "en"
    student_languages: list[str] = field(default_factory=lambda: ["zh", "ar", "bn"])
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_prompt_tokens: int = 512
    benign_retain: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("on_policy", "off_policy"):
            raise ValueError(f"mode must be on_policy or off_policy, got {self.mode!r}")
        if self.divergence not in KINDS:
            raise ValueError(f"divergence must be one of {KINDS}, got {self.divergence!r}")
        if self.divergence == "jsd" and not 0 < self.jsd_beta < 1:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.top_k < 1 or self.max_new_tokens < 1:
            raise ValueError(f"top_k ({self.top_k}) and max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if "{english_query}" not in self.teacher_template:
            raise ValueError("teacher_template must contain {english_query}: the teacher's advantage is the English query")
        self.teacher_language = normalize_code(self.teacher_language)
        self.student_languages = [normalize_code(c) for c in self.student_languages]
        if self.teacher_language in self.student_languages:
            raise ValueError(f"teacher language {self.teacher_language} is also a student language")
